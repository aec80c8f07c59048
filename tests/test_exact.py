"""MPE Theorems 1-4 on closed-form cases, against brute force."""
import torch

from mpe import exact
from mpe.sensitivity import logit_shift


def _ridge_data(n=40, d=5):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, y


def test_ridge_loo_equals_mpe():
    X, y = _ridge_data()
    theta, _ = exact.ridge_fit(X, y, 0.7)
    brute = exact.ridge_loo_brute_force(X, y, 0.7)
    dtheta, df = exact.ridge_mpe(X, y, 0.7)
    torch.testing.assert_close(dtheta, brute - theta, rtol=0, atol=1e-10)
    torch.testing.assert_close(df, ((brute - theta) * X).sum(1), rtol=0, atol=1e-10)


def test_beta_bernoulli_removal_exact():
    y = torch.tensor([1, 0, 1, 1, 0, 1.0])
    a_mpe, b_mpe = exact.beta_bernoulli_mpe(y, 2.0, 3.0)
    for i in range(len(y)):
        a, b = exact.beta_bernoulli_posterior(torch.cat([y[:i], y[i + 1:]]), 2.0, 3.0)
        assert (a_mpe[i], b_mpe[i]) == (a, b)


def test_influence_is_derivative_of_perturbed_minimiser():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 4, generator=g, dtype=torch.float64)
    y = (torch.rand(60, generator=g, dtype=torch.float64) < torch.sigmoid(X[:, 0])).double()
    theta = exact.logistic_fit(X, y, 1.0)
    i, eps = 3, 1e-5
    w = torch.ones(60, dtype=torch.float64)
    plus, minus = w.clone(), w.clone()
    plus[i] -= eps   # argmin L - eps * l_i
    minus[i] += eps
    fd = (exact.logistic_fit(X, y, 1.0, plus, theta) - exact.logistic_fit(X, y, 1.0, minus, theta)) / (2 * eps)
    torch.testing.assert_close(exact.influence(theta, X, y, 1.0, i), fd, rtol=1e-6, atol=1e-9)


def test_newton_form_is_woodbury_exact():
    """V (I - ΛV)^-1 e equals J (S - JᵀΛJ)^-1 Jᵀ e for any precision S (the ridge-exact LOO in logit space)."""
    g = torch.Generator().manual_seed(2)
    P, K = 12, 3
    A = torch.randn(P, P, generator=g, dtype=torch.float64)
    S = A @ A.T + 20 * torch.eye(P, dtype=torch.float64)
    J = torch.randn(1, K, P, generator=g, dtype=torch.float64)
    p = torch.softmax(torch.randn(1, K, generator=g, dtype=torch.float64), 1)
    e = p - torch.nn.functional.one_hot(torch.tensor([1]), K).double()
    V = J @ torch.linalg.solve(S, J[0].T)
    lam = torch.diag(p[0]) - torch.outer(p[0], p[0])
    brute = J[0] @ torch.linalg.solve(S - J[0].T @ lam @ J[0], J[0].T @ e[0])
    torch.testing.assert_close(logit_shift(V, e, p, "newton")[0], brute)


def test_mpe_newton_step_close_to_true_loo_for_logistic():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(200, 3, generator=g, dtype=torch.float64)
    y = (torch.rand(200, generator=g, dtype=torch.float64) < torch.sigmoid(2 * X[:, 0])).double()
    theta = exact.logistic_fit(X, y, 1.0)
    for i in range(5):
        keep = torch.arange(200) != i
        true = exact.logistic_fit(X[keep], y[keep], 1.0, theta0=theta) - theta
        est = exact.mpe_newton_removal(theta, X, y, 1.0, i) - theta
        assert (est - true).norm() < 0.05 * true.norm()


def test_ridge_natural_parameter_subtraction_equals_refits(f64):
    from mpe.exact import ridge_loo_brute_force, ridge_natural_removal

    g = torch.Generator().manual_seed(3)
    X = torch.randn(25, 4, generator=g, dtype=torch.float64)
    y = torch.randn(25, generator=g, dtype=torch.float64)
    assert torch.allclose(ridge_natural_removal(X, y, 0.7), ridge_loo_brute_force(X, y, 0.7), atol=1e-12)
