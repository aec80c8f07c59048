"""Newton, online Newton and VON steps against autograd Hessians; posterior samples against their covariance."""
import pytest
import torch
from torch import nn

from mpe import curvature as C
from mpe.blr import online_newton, posterior_residuals, posterior_samples
from mpe.sensitivity import residuals
from mpe.train import flat_params, predict


def _problem():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 1, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double(), x.double(), y


def _grad_hess(net, x, y, delta):
    """Gradient and Hessian of the sum-scale objective by autograd (softmax regression: Hessian = GGN)."""
    theta0 = flat_params(net)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]

    def L(theta):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = theta[i:i + s.numel()].view(s)
            i += s.numel()
        logits = torch.func.functional_call(net, parts, (x,))
        return nn.functional.cross_entropy(logits, y, reduction="sum") + 0.5 * delta * theta.pow(2).sum()

    return torch.func.grad(L)(theta0), torch.func.hessian(L)(theta0)


def test_one_full_batch_step_with_rate_one_is_newton():
    net, x, y = _problem()
    g, H = _grad_hess(net, x, y, delta=0.5)
    theta0 = flat_params(net)
    post = online_newton(net, x, y, delta=0.5, steps=1, lr=1.0, s0=7.0)
    torch.testing.assert_close(flat_params(net), theta0 - torch.linalg.solve(H, g))
    torch.testing.assert_close(post.data, H)


def test_damped_diagonal_step_mixes_the_old_precision():
    net, x, y = _problem()
    g, H = _grad_hess(net, x, y, delta=0.5)
    theta0, rho, s0 = flat_params(net), 0.3, 2.0
    post = online_newton(net, x, y, delta=0.5, steps=1, lr=rho, s0=s0, diagonal=True)
    s = (1 - rho) * s0 + rho * H.diagonal()
    torch.testing.assert_close(post.data, s)
    torch.testing.assert_close(flat_params(net), theta0 - rho * g / s)


def test_newton_converges_to_the_minimiser():
    net, x, y = _problem()
    online_newton(net, x, y, delta=0.5, steps=40, lr=0.7)
    g, _ = _grad_hess(net, x, y, delta=0.5)
    assert g.norm() < 1e-8


def test_von_with_tight_posterior_matches_online_newton():
    """With S₀ huge and ρ_S tiny, posterior samples sit on the mean: VON = ON (same minibatches, same seed)."""
    runs = []
    for mc in (0, 3):
        net, x, y = _problem()
        online_newton(net, x, y, delta=0.5, steps=4, lr=0.5, lr_prec=1e-12, s0=1e14, batch_size=10, mc_samples=mc)
        runs.append(flat_params(net))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-5, atol=1e-9)


def test_posterior_samples_have_covariance_s_inverse():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(3, 3, generator=g, dtype=torch.float64)
    S = A @ A.T + 3 * torch.eye(3, dtype=torch.float64)
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    th = posterior_samples(mean, C.Posterior("full", S), 200000, g)
    torch.testing.assert_close(th.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(torch.cov(th.T), torch.linalg.inv(S), atol=0.01, rtol=0)
    thd = posterior_samples(mean, C.Posterior("diag", torch.tensor([4.0, 1.0, 0.25], dtype=torch.float64)), 100000, g)
    torch.testing.assert_close(thd.std(0), torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), atol=0.02, rtol=0)


def test_posterior_residuals_of_a_point_mass_are_the_residuals_and_the_model_is_restored():
    net, x, y = _problem()
    theta = flat_params(net)
    e = posterior_residuals(net, x, y, C.Posterior("diag", torch.full_like(theta, 1e16)), 4)
    torch.testing.assert_close(e, residuals(predict(net, x), y, clamp=False))
    torch.testing.assert_close(flat_params(net), theta)


def test_bad_arguments_fail_early():
    net, x, y = _problem()
    with pytest.raises(ValueError, match="steps >= 1"):
        online_newton(net, x, y, delta=1.0, steps=0)
    with pytest.raises(ValueError, match="full covariance"):
        online_newton(net, x, y, delta=1.0, steps=1, diagonal=True, mc_samples=2)
