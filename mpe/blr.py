r"""The Bayesian learning rule's Newton-type special cases for small models (MPE §3, Eqs. 29–33, Table 1).

With L(θ) = Σ_i ℓ_i(θ) + δ/2 ‖θ‖² (sum scale), a minibatch B of size b, ĝ = (N/b) Σ_{i∈B} ∇ℓ_i + δθ and
Ĥ = (N/b) Σ_{i∈B} J_iᵀΛ_iJ_i + δI (the generalised Gauss–Newton; it equals the Hessian for softmax regression):

    online Newton (ON, Eq. 30–31)   S_t = (1 − ρ_S) S_{t−1} + ρ_S Ĥ(θ_{t−1}),   θ_t = θ_{t−1} − ρ S_t⁻¹ ĝ(θ_{t−1})
    Newton (Eq. 33)                 ρ = ρ_S = 1, full batch
    ON, diagonal (Eq. 32)           the same with diag(Ĥ)
    VON (Eq. 29)                    ĝ, Ĥ replaced by their expectations under q = N(m, S⁻¹), estimated with
                                    ``mc_samples`` posterior samples (θ_t is the mean m_t)

:func:`online_newton` runs all four and returns the final precision as a :class:`mpe.curvature.Posterior`, which is
the algorithm's own variance for the MPE (Table 1: the sensitivity of example i is S_t⁻¹∇ℓ_i(θ_t)). It forms the
P×P GGN (full) or its diagonal, so it is meant for models with P up to a few thousand parameters.
"""
from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from . import curvature as C
from .train import flat_params, predict, set_flat_params

__all__ = ["online_newton", "posterior_samples", "posterior_residuals"]


def _grad_and_curvature(model, x, y, scale: float, delta: float, diagonal: bool):
    """ĝ (P,) and Ĥ ((P, P) or (P,)) of scale·Σ_batch ℓ_i + δ/2‖θ‖² at the model's current parameters."""
    theta = flat_params(model)
    model.zero_grad()
    loss = F.cross_entropy(model(x), y, reduction="sum") * scale
    loss.backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]) + delta * theta
    model.zero_grad()
    if diagonal:
        return g, scale * C.ggn_diag(model, x) + delta
    H = scale * C.ggn_full(model, x)
    return g, H + delta * torch.eye(len(H), dtype=H.dtype, device=H.device)


def posterior_samples(mean: torch.Tensor, posterior: C.Posterior, n: int, generator=None) -> torch.Tensor:
    """θ_s ~ N(mean, S⁻¹) for a full or diagonal precision S, shape (n, P)."""
    eps = torch.randn((n, len(mean)), generator=generator, dtype=mean.dtype).to(mean.device)
    if posterior.kind == "diag":
        return mean + eps / posterior.data.sqrt()
    if posterior.kind == "full":
        chol = torch.linalg.cholesky(posterior.data)  # S = L Lᵀ, so L⁻ᵀ ε has covariance S⁻¹
        return mean + torch.linalg.solve_triangular(chol.T, eps.T, upper=True).T
    raise ValueError(f"posterior samples need a full or diag precision, got {posterior.kind!r}")


def posterior_residuals(model, x, y, posterior: C.Posterior, n_samples: int = 150, generator=None) -> torch.Tensor:
    """e_i = E_q[softmax(f_i(θ))] − y_i (N, K), from ``n_samples`` parameter samples θ ~ q; the model is restored."""
    mean = flat_params(model)
    probs = 0
    try:
        for theta in posterior_samples(mean, posterior, n_samples, generator):
            set_flat_params(model, theta)
            probs = probs + torch.softmax(predict(model, x), 1)
    finally:
        set_flat_params(model, mean)
    return probs / n_samples - F.one_hot(y.to(mean.device), probs.shape[1]).to(probs.dtype)


def online_newton(model, x, y, *, delta: float, steps: int, lr: float = 1.0, lr_end: float | None = None,
                  lr_prec: float | None = None, batch_size: int | None = None, diagonal: bool = False,
                  mc_samples: int = 0, s0: torch.Tensor | float | None = None, seed: int = 0, callbacks=(),
                  progress: bool = False) -> C.Posterior:
    r"""Run ``steps`` updates of (online) Newton or VON on ``model`` in place; return the final precision S_T.

    ``lr`` = ρ for the mean, decayed linearly to ``lr_end`` (default: constant); ``lr_prec`` = ρ_S for S (default
    ρ). ``batch_size=None`` is full batch; minibatches are drawn without replacement, reshuffled every pass.
    ``mc_samples=0`` evaluates ĝ, Ĥ at θ (the delta method: Newton/ON); ``mc_samples>0`` averages them over samples
    of q = N(m, S_{t−1}⁻¹) (VON). ``s0`` is S_0 (a scalar times I, a diagonal (P,), or a (P, P) matrix); by default
    S_0 = Ĥ at the initial parameters on the full data. After each update ``cb.on_step(state)`` is called with
    ``state.model``, ``state.step``, ``state.posterior`` and ``state.s0`` (S_0, to measure how far S has moved).
    """
    if steps < 1 or lr <= 0 or delta < 0:
        raise ValueError(f"need steps >= 1, lr > 0 and delta >= 0; got steps={steps}, lr={lr}, delta={delta}")
    if diagonal and mc_samples:
        raise ValueError("VON (mc_samples > 0) is implemented with a full covariance only")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    n = len(x)
    bs = n if batch_size is None else min(batch_size, n)
    lr_end = lr if lr_end is None else lr_end
    lr_prec = lr if lr_prec is None else lr_prec
    gen = torch.Generator().manual_seed(seed)
    theta = flat_params(model)
    if s0 is None:
        S = _grad_and_curvature(model, x, y, 1.0, delta, diagonal)[1]
    else:
        s0 = torch.as_tensor(s0, dtype=theta.dtype, device=device)
        S = s0 if s0.dim() == (1 if diagonal else 2) else (s0 * torch.ones_like(theta) if diagonal
                                                          else torch.diag(s0.expand_as(theta)).clone())
    kind = "diag" if diagonal else "full"
    state = SimpleNamespace(model=model, step=0, posterior=C.Posterior(kind, S, delta), s0=S.clone())
    order, pos = torch.randperm(n, generator=gen), 0
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="online Newton" if not mc_samples else "VON", leave=False)
    for t in it:
        if pos + bs > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + bs].to(device)
        pos += bs
        thetas = (posterior_samples(theta, C.Posterior(kind, S), mc_samples, gen) if mc_samples
                  else theta.unsqueeze(0))
        g, H = 0, 0
        for th in thetas:
            set_flat_params(model, th)
            gs, Hs = _grad_and_curvature(model, x[idx], y[idx], n / bs, delta, diagonal)
            g, H = g + gs / len(thetas), H + Hs / len(thetas)
        rho = lr + (lr_end - lr) * t / max(steps - 1, 1)
        S = (1 - lr_prec) * S + lr_prec * H
        theta = theta - rho * (g / S if diagonal else torch.linalg.solve(S, g))
        set_flat_params(model, theta)
        state.step, state.posterior = t + 1, C.Posterior(kind, S, delta)
        for cb in callbacks:
            cb.on_step(state)
    return state.posterior
