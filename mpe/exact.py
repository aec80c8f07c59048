r"""Closed-form cases where the MPE is exact or checkable to machine precision (MPE Theorems 1–4).

- Ridge regression (Eq. 2, Thm. 3):   θ^{\i} − θ_* = (H^{\i})⁻¹ x_i e_i,  f_i(θ^{\i}) − f_i(θ_*) = v_i^{\i} e_i.
- Beta–Bernoulli (Eq. 35, Thm. 1/2):  α^{\i} = α_* − y_i,  β^{\i} = β_* − (1 − y_i).
- Logistic regression (Thm. 4, Eq. 3): the derivative of argmin L − ε ℓ_i at ε = 0 is H_*⁻¹ ∇ℓ_i(θ_*), which is
  what the Gaussian MPE of Eq. 10 gives with the delta method (S = H_*, E_q[∇ℓ_i] ≈ ∇ℓ_i(θ_*)).

All functions work in float64 on tensors ``X (N, D)``, ``y (N,)``.
"""
from __future__ import annotations

import torch

__all__ = ["ridge_fit", "ridge_loo_brute_force", "ridge_mpe", "ridge_natural_removal", "beta_bernoulli_posterior",
           "beta_bernoulli_mpe", "logistic_fit", "logistic_grad_hess", "influence", "mpe_newton_removal"]


def ridge_fit(X, y, delta: float, weights=None):
    """θ_* = argmin ½ Σ_i w_i (y_i − x_iᵀθ)² + δ/2 ‖θ‖²; returns (θ (D,), H (D, D))."""
    w = torch.ones(len(X), dtype=X.dtype) if weights is None else weights
    H = X.T @ (w[:, None] * X) + delta * torch.eye(X.shape[1], dtype=X.dtype)
    return torch.linalg.solve(H, X.T @ (w * y)), H


def ridge_loo_brute_force(X, y, delta: float):
    """Refit without each example: θ^{\\i} (N, D)."""
    n = len(X)
    return torch.stack([ridge_fit(X[torch.arange(n) != i], y[torch.arange(n) != i], delta)[0] for i in range(n)])


def ridge_mpe(X, y, delta: float):
    """Eq. 2 for every i at once: θ^{\\i} − θ_* = (H − x_i x_iᵀ)⁻¹ x_i e_i and Δf_i = v_i^{\\i} e_i.

    Returns (Δθ (N, D), Δf (N,)), via Sherman–Morrison: (H^{\\i})⁻¹ x_i = Σ x_i / (1 − v_i), v_i = x_iᵀ Σ x_i.
    """
    theta, H = ridge_fit(X, y, delta)
    Sigma = torch.linalg.inv(H)
    e = X @ theta - y
    SX = X @ Sigma  # rows Σ x_i
    v = (SX * X).sum(1)
    dtheta = SX * (e / (1 - v))[:, None]
    return dtheta, v / (1 - v) * e  # v_i^{\i} = v_i / (1 − v_i)


def ridge_natural_removal(X, y, delta: float):
    """The MPE's own route (Eq. 6) for ridge regression: the Gaussian posterior's natural parameters are the prior's
    plus one site per example, λ = (Σ_j x_j y_j, −½(δI + Σ_j x_j x_jᵀ)); removing example i subtracts its site
    λ̃_i = (x_i y_i, −½ x_i x_iᵀ), and the mean of the result, m^{\\i} = (−2 λ₂^{\\i})⁻¹ λ₁^{\\i}, is θ^{\\i} (N, D).
    Nothing is refitted: only natural parameters are subtracted."""
    lam1 = X.T @ y
    lam2 = -0.5 * (X.T @ X + delta * torch.eye(X.shape[1], dtype=X.dtype))
    site1 = X * y[:, None]  # (N, D)
    site2 = -0.5 * X[:, :, None] * X[:, None, :]  # (N, D, D)
    return torch.linalg.solve(-2 * (lam2 - site2), (lam1 - site1).unsqueeze(2)).squeeze(2)


def beta_bernoulli_posterior(y, a0: float, b0: float):
    """Posterior Beta(α, β) of a Bernoulli rate after observations y ∈ {0, 1}^N with prior Beta(a0, b0)."""
    y = torch.as_tensor(y, dtype=torch.float64)
    return a0 + y.sum(), b0 + (1 - y).sum()


def beta_bernoulli_mpe(y, a0: float, b0: float):
    """Eq. 35: removing y_i subtracts its natural-parameter site λ̃_i = (y_i, y_i − 1): returns (α^{\\i}, β^{\\i}) (N,)."""
    a, b = beta_bernoulli_posterior(y, a0, b0)
    y = torch.as_tensor(y, dtype=torch.float64)
    return a - y, b + (y - 1)


def logistic_grad_hess(theta, X, y, delta: float, weights=None):
    """Gradient (D,) and Hessian (D, D) of L = Σ w_i ℓ_i + δ/2 ‖θ‖², ℓ_i the binary logistic loss (y ∈ {0, 1})."""
    w = torch.ones(len(X), dtype=X.dtype) if weights is None else weights
    p = torch.sigmoid(X @ theta)
    g = X.T @ (w * (p - y)) + delta * theta
    H = X.T @ ((w * p * (1 - p))[:, None] * X) + delta * torch.eye(X.shape[1], dtype=X.dtype)
    return g, H


def logistic_fit(X, y, delta: float, weights=None, theta0=None, tol: float = 1e-13, max_iter: int = 100):
    """Newton's method to machine precision; returns θ_* (D,)."""
    theta = torch.zeros(X.shape[1], dtype=X.dtype) if theta0 is None else theta0.clone()
    for _ in range(max_iter):
        g, H = logistic_grad_hess(theta, X, y, delta, weights)
        step = torch.linalg.solve(H, g)
        theta = theta - step
        if step.abs().max() < tol:
            break
    return theta


def influence(theta, X, y, delta: float, i: int):
    """Eq. 3: ∂θ^{ε_i}/∂ε_i at 0 = H_*⁻¹ ∇ℓ_i(θ_*) for the perturbation argmin L − ε ℓ_i."""
    _, H = logistic_grad_hess(theta, X, y, delta)
    p = torch.sigmoid(X[i] @ theta)
    return torch.linalg.solve(H, X[i] * (p - y[i]))


def mpe_newton_removal(theta, X, y, delta: float, i: int):
    """Eq. 9 at ρ = 1 with the delta method: Ŝ^{\\i} = H_* − ∇²ℓ_i, m̂^{\\i} = θ_* + (Ŝ^{\\i})⁻¹ ∇ℓ_i(θ_*)."""
    _, H = logistic_grad_hess(theta, X, y, delta)
    p = torch.sigmoid(X[i] @ theta)
    S_minus = H - p * (1 - p) * torch.outer(X[i], X[i])
    return theta + torch.linalg.solve(S_minus, X[i] * (p - y[i]))
