r"""Function-space distance (FSD) between two networks and its approximations (LAFTR paper, notes §1).

    D_ρ(θ₀, θ₁) = E_x ρ(f(x, θ₀), f(x, θ₁)),

with ρ one of :data:`METRICS`: ``"kl"`` = KL(softmax(y⁰) ‖ softmax(y¹)) (classification), ``"euclidean"`` =
½‖y¹ − y⁰‖² (regression) and ``"softmax_l2"`` = ½‖softmax(y¹) − softmax(y⁰)‖² (the official code's other option).

Approximations, for ReLU networks given as ``nn.Sequential`` of Linear, Conv2d, ReLU, MaxPool2d, Flatten and Dropout
(:func:`difference_network`; the closed form is for MLPs):

- :func:`laftr` — the Linearized Activation Function TRick on data: the exact difference network with the ReLU
  replaced by the gate of the *old* network, Δa = 1[s⁰ > 0] ⊙ Δs, and the *new* weights W₁ in the propagation
  (Δs = ΔW a⁰ + W₁ Δa + Δb). Exact for linear networks and whenever no gate flips.
- :func:`ntk` — the parameter-linearised network f(x, θ₀) + J Δθ: the same recurrence with W₀ in place of W₁.
- :func:`laftr_bernoulli` — the parametric LAFTR: inputs from a Gaussian fitted to the data (:func:`input_gaussian`)
  and independent Bernoulli gates with p = the fraction of inputs on which each unit is active
  (:func:`unit_probs`, one number per unit), by Monte Carlo; :func:`laftr_bernoulli_exact` is its closed form for the
  Euclidean metric (notes §1.8b: the official ``determ_fsd`` misses terms and is about 2× too small).
- :func:`quadratic` — ½ Δθᵀ G Δθ / N with the Gauss-Newton matrix in diagonal (EWC) or K-FAC form, computed once
  and returned as a penalty function of the new network.

Every estimate is differentiable in the new network's parameters, so it can serve as a continual-learning
regulariser or as the data term of the PBRF.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["METRICS", "rho", "fsd", "mlp_linears", "difference_network", "laftr", "ntk", "unit_probs", "input_gaussian",
           "laftr_bernoulli", "laftr_bernoulli_exact", "quadratic", "Head", "ESTIMATORS", "estimator", "memory"]

METRICS = ("kl", "euclidean", "softmax_l2")


def rho(y0: torch.Tensor, y1: torch.Tensor, metric: str = "kl", outputs=None) -> torch.Tensor:
    """ρ(y⁰, y¹) per example (N,) for outputs (N, K); y⁰ is the reference (old) network's. ``outputs`` (indices)
    restricts both to one task's head first (multi-head continual learning)."""
    if outputs is not None:
        y0, y1 = y0[:, outputs], y1[:, outputs]
    if metric == "kl":
        logp0 = F.log_softmax(y0, 1)
        return (logp0.exp() * (logp0 - F.log_softmax(y1, 1))).sum(1)
    if metric == "euclidean":
        return 0.5 * (y1 - y0).pow(2).sum(1)
    if metric == "softmax_l2":
        return 0.5 * (F.softmax(y1, 1) - F.softmax(y0, 1)).pow(2).sum(1)
    raise ValueError(f"unknown metric {metric!r}; valid choices: {', '.join(METRICS)}")


def fsd(model0: nn.Module, model1: nn.Module, x: torch.Tensor, metric: str = "kl", outputs=None,
        batch_size: int = 4096) -> torch.Tensor:
    """The true FSD over the examples x (N, ...): the mean of ρ, differentiable in ``model1``'s parameters (the
    reference outputs are detached). Both models are used as they are (call ``.eval()`` for dropout or BN)."""
    total = 0.0
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size]
        with torch.no_grad():
            y0 = model0(xb)
        total = total + rho(y0, model1(xb), metric, outputs).sum()
    return total / len(x)


def mlp_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a ReLU MLP (Flatten? Linear (ReLU Linear)*); a clear error for other architectures."""
    mods = [m for m in model.children() if not isinstance(m, (nn.Flatten, nn.Identity))] \
        if isinstance(model, nn.Sequential) else [model]
    ok = (len(mods) % 2 == 1 and all(isinstance(m, nn.Linear) for m in mods[::2])
          and all(isinstance(m, nn.ReLU) for m in mods[1::2]))
    if not ok:
        raise NotImplementedError("this FSD approximation handles ReLU MLPs (Linear, ReLU, ..., Linear) only; got "
                                  + ", ".join(type(m).__name__ for m in mods))
    return mods[::2]


_LAYERS = (nn.Linear, nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Dropout2d, nn.Identity)


def _modules(model: nn.Module) -> list[nn.Module]:
    mods = list(model.children()) if isinstance(model, nn.Sequential) else [model]
    bad = sorted({type(m).__name__ for m in mods if not isinstance(m, _LAYERS)})
    if bad:
        raise NotImplementedError(f"the difference network handles Sequential models of Linear, Conv2d, ReLU, "
                                  f"MaxPool2d, Flatten and Dropout (identity in eval mode); got {', '.join(bad)}")
    return mods


def _affine(m, a, w, b):
    if isinstance(m, nn.Linear):
        return F.linear(a, w, b)
    return F.conv2d(a, w, b, m.stride, m.padding, m.dilation, m.groups)


def difference_network(model0: nn.Module, model1: nn.Module, x: torch.Tensor, *, weights: str = "new",
                       probs: list[torch.Tensor] | None = None, generator: torch.Generator | None = None):
    r"""(y⁰, Δy), each (N, K): the old network's output and the linearised output change, walking a Sequential of
    Linear / Conv2d / ReLU / MaxPool2d / Flatten / Dropout layers (dropout is the identity, as in eval mode).

    Affine layers: Δs = ΔW a⁰ + W Δa + Δb with W = W₁ (``weights="new"``, LAFTR) or W₀ (``"old"``, the NTK).
    ReLU: a gate m multiplies both, a⁰ ← m ⊙ s⁰ and Δa ← m ⊙ Δs, with m = 1[s⁰ > 0] (the old network's gates) or,
    given ``probs`` (one tensor per ReLU, shaped like one example's activation), m ~ Bernoulli(p) drawn per example
    and unit. Max-pooling (notes §1.9): LAFTR pools both networks' activations, Δa ← pool(a⁰ + Δa) − pool(a⁰); the
    NTK takes Δa at the old network's maxima (its exact linearisation)."""
    if weights not in ("new", "old"):
        raise ValueError(f"weights must be new (LAFTR) or old (NTK), got {weights!r}")
    m0s, m1s = _modules(model0), _modules(model1)
    n_relu = sum(isinstance(m, nn.ReLU) for m in m0s)
    if probs is not None and len(probs) != n_relu:
        raise ValueError(f"need one probability tensor per ReLU ({n_relu}), got {len(probs)}")
    a0, da, r = x, torch.zeros_like(x), 0
    for m0, m1 in zip(m0s, m1s):
        if isinstance(m0, (nn.Linear, nn.Conv2d)):
            w0 = m0.weight.detach()
            b0 = None if m0.bias is None else m0.bias.detach()
            db = None if m0.bias is None else m1.bias - b0
            s0 = _affine(m0, a0, w0, b0)
            da = _affine(m0, a0, m1.weight - w0, db) + _affine(m0, da, m1.weight if weights == "new" else w0, None)
            a0 = s0
        elif isinstance(m0, nn.ReLU):
            if probs is None:
                gate = (a0 > 0).to(a0.dtype)
            else:
                # drawn where the generator lives (a CPU generator keeps CPU and GPU runs on one stream)
                where = a0.device if generator is None else generator.device
                gate = torch.bernoulli(probs[r].to(where, a0.dtype).expand(a0.shape), generator=generator).to(a0.device)
            r += 1
            a0, da = a0 * gate, da * gate
        elif isinstance(m0, nn.MaxPool2d):
            p0, idx = F.max_pool2d(a0, m0.kernel_size, m0.stride, m0.padding, m0.dilation, m0.ceil_mode,
                                   return_indices=True)
            if weights == "new":
                da = F.max_pool2d(a0 + da, m0.kernel_size, m0.stride, m0.padding, m0.dilation, m0.ceil_mode) - p0
            else:
                da = da.flatten(2).gather(2, idx.flatten(2)).view_as(p0)
            a0 = p0
        elif isinstance(m0, nn.Flatten):
            a0, da = m0(a0), m0(da)
    return a0, da


def laftr(model0: nn.Module, model1: nn.Module, x: torch.Tensor, metric: str = "kl", outputs=None) -> torch.Tensor:
    """LAFTR on data x (N, ...): mean ρ(y⁰, y⁰ + Δy) with the old network's gates and the new weights."""
    y0, dy = difference_network(model0, model1, x, weights="new")
    return rho(y0, y0 + dy, metric, outputs).mean()


def ntk(model0: nn.Module, model1: nn.Module, x: torch.Tensor, metric: str = "kl", outputs=None) -> torch.Tensor:
    """The NTK-linearised FSD on data x: mean ρ(f(x, θ₀), f(x, θ₀) + J(x) Δθ)."""
    y0, dy = difference_network(model0, model1, x, weights="old")
    return rho(y0, y0 + dy, metric, outputs).mean()


@torch.no_grad()
def unit_probs(model0: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """p per ReLU, shaped like one example's activation ((n,) for a Linear layer, (C, H, W) for a conv layer): the
    fraction of the inputs x on which each unit of the old network is active (s⁰ ≥ 0) — LAFTR's one parameter per
    unit (per channel and position in conv nets). Dropout is skipped (eval mode)."""
    a, out = x, []
    for m in _modules(model0):
        if isinstance(m, nn.ReLU):
            out.append((a >= 0).float().mean(0))
        if not isinstance(m, (nn.Dropout, nn.Dropout2d)):
            a = m(a)
    return out


def input_gaussian(x: torch.Tensor, jitter: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and covariance (D, D) of the flattened inputs, plus ``jitter``·I (as the official code)."""
    f = x.flatten(1).double()
    mu = f.mean(0)
    cov = torch.cov(f.T, correction=0) + jitter * torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
    return mu.to(x.dtype), cov.to(x.dtype)


def laftr_bernoulli(model0: nn.Module, model1: nn.Module, probs: list[torch.Tensor], x: torch.Tensor,
                    metric: str = "kl", generator: torch.Generator | None = None, outputs=None) -> torch.Tensor:
    r"""The parametric LAFTR by Monte Carlo on input samples x (S, ...) — Gaussian draws (:func:`input_gaussian`)
    or a stored coreset — with independent gates m ~ Bernoulli(p) per sample and unit, the same gate on both
    networks: a⁰ = m ⊙ s⁰ (gated pre-activations) and Δa = m ⊙ Δs. Returns the mean ρ over the samples. MLPs and
    conv nets (:func:`difference_network`)."""
    y0, dy = difference_network(model0, model1, x, weights="new", probs=probs, generator=generator)
    return rho(y0, y0 + dy, metric, outputs).mean()


def laftr_bernoulli_exact(model0: nn.Module, model1: nn.Module, probs: list[torch.Tensor], mu: torch.Tensor,
                          cov: torch.Tensor) -> torch.Tensor:
    r"""E[½‖Δy‖²] of the parametric LAFTR in closed form (notes §1.8b), for x ~ N(μ, Σ) and Bernoulli gates.

    With z = [a⁰; Δa], each layer maps u = A z + c, A = [[W₀, 0], [ΔW, W₁]], c = [b₀; Δb], then z′ = M ⊙ u with
    M = [m; m]: E z′ = [p; p] ⊙ E u and E z′z′ᵀ = E[MMᵀ] ⊙ E uuᵀ, where E[MMᵀ] = p pᵀ off the unit's own four
    entries, which are p_k (m_k² = m_k). O(n²) memory per layer: for MLPs."""
    l0, l1 = mlp_linears(model0), mlp_linears(model1)
    d = mu.numel()
    ez = torch.cat([mu, torch.zeros_like(mu)]).double()
    ezz = torch.zeros(2 * d, 2 * d, dtype=torch.float64, device=mu.device)
    ezz[:d, :d] = (cov + torch.outer(mu, mu)).double()
    for k, (m0, m1) in enumerate(zip(l0, l1)):
        w0, w1 = m0.weight.double(), m1.weight.double()
        c = torch.cat([m0.bias, m1.bias - m0.bias]).double()
        if k == len(l0) - 1:  # Δy = [ΔW, W₁] z + Δb
            B, db = torch.cat([w1 - w0, w1], 1), c[len(m0.bias):]
            eb = B @ ez
            return 0.5 * (torch.trace(B @ ezz @ B.T) + 2 * eb @ db + db @ db)
        n = w0.shape[0]
        A = torch.cat([torch.cat([w0, torch.zeros_like(w0)], 1), torch.cat([w1 - w0, w1], 1)], 0)
        eu = A @ ez + c
        ae = A @ ez
        euu = A @ ezz @ A.T + torch.outer(ae, c) + torch.outer(c, ae) + torch.outer(c, c)
        p = torch.cat([probs[k], probs[k]]).double()
        emm = torch.outer(p, p)
        i = torch.arange(n, device=p.device)
        for r, s in ((i, i), (i, i + n), (i + n, i), (i + n, i + n)):
            emm[r, s] = p[:n]
        ez, ezz = p * eu, emm * euu


class Head(nn.Module):
    """A view of ``model`` that returns only the logits ``outputs`` (one task's head)."""

    def __init__(self, model: nn.Module, outputs):
        super().__init__()
        self.model, self.outputs = model, outputs
        self.model_name = getattr(model, "model_name", type(model).__name__)  # the training ledger counts the model

    def forward(self, x):
        out = self.model(x)
        return out if self.outputs is None else out[:, self.outputs]


def quadratic(model0: nn.Module, x: torch.Tensor, form: str = "diag", outputs=None):
    r"""The quadratic FSD approximation ½ Δθᵀ Ĝ Δθ around the old network, as a function of the new one.

    Ĝ is the KL metric's Gauss-Newton (Fisher) matrix of ``model0`` (restricted to the head ``outputs``) averaged
    over x, computed once here: "diag" (EWC; P numbers) or "kfac" (per Linear/Conv2d layer (1/T) A ⊗ G from
    :func:`mpe.curvature.kfac_factors`). Returns ``penalty(model1) -> scalar``, differentiable in ``model1``, with
    ``penalty.solve(v, λ)`` = (Ĝ + λI)⁻¹ v for a flat v (P,) in ``parameters()`` order, exact for either form."""
    from .curvature import ggn_diag, kfac_factors

    theta0 = [p.detach().clone() for p in model0.parameters()]
    head = Head(model0, outputs)
    if form == "diag":
        g = ggn_diag(head, x) / len(x)

        def penalty(model1):
            d = torch.cat([(p1 - p0).reshape(-1) for p0, p1 in zip(theta0, model1.parameters())])
            return 0.5 * (g * d.pow(2)).sum()

        def solve(v, damping):  # (Ĝ + λI)⁻¹ v, v flat (P,)
            return v / (g.to(v.dtype) + damping)
        penalty.solve = solve
        return penalty
    if form == "kfac":
        layers = [m for m in model0.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        position = {id(p): i for i, p in enumerate(model0.parameters())}
        slots = [(position[id(m.weight)], None if m.bias is None else position[id(m.bias)]) for m in layers]
        factors = kfac_factors(head, x)

        def penalty(model1):
            params, total = list(model1.parameters()), 0.0
            for (w, b), (A, G, count) in zip(slots, factors):
                dw = (params[w] - theta0[w]).reshape(theta0[w].shape[0], -1)
                if b is not None:
                    dw = torch.cat([dw, (params[b] - theta0[b])[:, None]], 1)
                total = total + torch.trace(G @ dw @ A @ dw.T) / count
            return 0.5 * total / len(x)  # the factors approximate the GGN summed over the examples

        sizes, eig = [p.numel() for p in theta0], []

        def solve(v, damping):  # (Ĝ + λI)⁻¹ v blockwise: vec(dW) ↦ Q_G [(Q_Gᵀ R Q_A) / (λ_G λ_Aᵀ / s + λ)] Q_Aᵀ
            if sum(theta0[w].numel() + (0 if b is None else theta0[b].numel()) for w, b in slots) != sum(sizes):
                raise NotImplementedError("K-FAC covers Linear and Conv2d layers only; the model has other parameters")
            if not eig:  # the factors' eigenbases, once
                eig.extend((torch.linalg.eigh(A), torch.linalg.eigh(G), count * len(x)) for A, G, count in factors)
            parts, out = list(torch.split(v, sizes)), [None] * len(sizes)
            for (w, b), ((la, qa), (lg, qg), s) in zip(slots, eig):
                r = parts[w].reshape(theta0[w].shape[0], -1)
                if b is not None:
                    r = torch.cat([r, parts[b][:, None]], 1)
                qa, qg, la, lg = (t.to(v.dtype) for t in (qa, qg, la, lg))
                dw = qg @ ((qg.T @ r @ qa) / (lg[:, None] * la[None, :] / s + damping)) @ qa.T
                out[w] = (dw[:, :-1] if b is not None else dw).reshape(-1)
                if b is not None:
                    out[b] = dw[:, -1]
            return torch.cat(out)
        penalty.solve = solve
        return penalty
    raise ValueError(f"unknown form {form!r}; valid choices: diag, kfac")


ESTIMATORS = ("true", "laftr", "laftr_data", "ntk", "ewc", "kfac", "coreset")


def estimator(name: str, old: nn.Module, x: torch.Tensor, *, y: torch.Tensor | None = None, outputs=None,
              metric: str = "kl", n_samples: int = 40, n_coreset: int = 40, inputs: str = "gaussian",
              gates: str = "bernoulli", classwise: bool = False, resample: bool = True,
              generator: torch.Generator | None = None):
    r"""``term(net) -> scalar``: an estimate of the FSD between ``old`` and ``net`` on the inputs x (N, ...), with
    every statistic computed once, here. ``name`` is one of :data:`ESTIMATORS`:

    - ``"true"`` (all of x), ``"laftr_data"`` (old gates on x), ``"ntk"`` (on x): they iterate over the data;
    - ``"ewc"`` / ``"kfac"``: :func:`quadratic`; ``"coreset"``: the exact FSD on ``n_coreset`` random inputs of x;
    - ``"laftr"``: the parametric LAFTR on ``n_samples`` inputs from the Gaussian of x (``inputs="coreset"``: stored
      inputs instead), with Bernoulli gates (``gates="relu"``: the old network's gates on those inputs), pooled or
      one Gaussian and one set of probabilities per class (``classwise=True``, needs y).

    ``resample=True`` draws fresh samples and gates at every call (a stochastic training regulariser);
    ``resample=False`` fixes them, so the term is a deterministic function (for L-BFGS solves).
    """
    if name not in ESTIMATORS:
        raise ValueError(f"unknown FSD estimator {name!r}; valid choices: {', '.join(ESTIMATORS)}")
    if inputs not in ("gaussian", "coreset") or gates not in ("bernoulli", "relu"):
        raise ValueError(f"inputs must be gaussian or coreset and gates bernoulli or relu, got {inputs}, {gates}")
    old.eval()
    if name == "true":
        return lambda net: fsd(old, net, x, metric, outputs)
    if name in ("laftr_data", "ntk"):
        f = laftr if name == "laftr_data" else ntk
        return lambda net: f(old, net, x, metric, outputs)
    if name in ("ewc", "kfac"):
        return quadratic(old, x, "diag" if name == "ewc" else "kfac", outputs)
    g = torch.Generator().manual_seed(0) if generator is None else generator
    coreset = x[torch.randperm(len(x), generator=g)[:n_coreset]]
    if name == "coreset":
        return lambda net: fsd(old, net, coreset, metric, outputs)
    if classwise and y is None:
        raise ValueError("class-wise statistics need the labels y")
    groups = [y == c for c in torch.unique(y)] if classwise else [torch.ones(len(x), dtype=torch.bool, device=x.device)]
    per_group, shape = max(n_samples // len(groups), 1), x.shape[1:]
    stats = []
    for mask in groups:
        probs = unit_probs(old, x[mask])
        if inputs == "gaussian":
            mu, cov = input_gaussian(x[mask])
            stats.append((probs, mu, torch.linalg.cholesky(cov.double()).to(mu.dtype)))
        else:  # stored inputs of the group instead of Gaussian samples
            idx = torch.nonzero(mask).flatten()
            stats.append((probs, None, x[idx[torch.randperm(len(idx), generator=g)[:max(n_coreset // len(groups), 1)]]]))

    def draw(mu, chol_or_core):
        if mu is None:
            return chol_or_core
        z = torch.randn(per_group, len(mu), generator=g, dtype=mu.dtype).to(mu.device)  # the CPU stream on any device
        return (mu + z @ chol_or_core.T).view(per_group, *shape)

    fixed = None if resample else [draw(mu, c) for _, mu, c in stats]
    gate_seed = None if resample else int(torch.randint(0, 2**31, (1,), generator=g))

    def term(net):
        gen = g if resample else torch.Generator().manual_seed(gate_seed)
        total = 0.0
        for k, (probs, mu, chol_or_core) in enumerate(stats):
            xs = draw(mu, chol_or_core) if resample else fixed[k]
            if gates == "bernoulli":
                total = total + laftr_bernoulli(old, net, probs, xs, metric, generator=gen, outputs=outputs)
            else:
                total = total + laftr(old, net, xs, metric, outputs)
        return total / len(stats)
    return term


def memory(model: nn.Module, in_shape, n_coreset: int = 0) -> dict:
    """Numbers stored per task by each FSD approximation, besides the parameters θ* every method keeps: the
    diagonal Fisher (P), the K-FAC factors (Σ (d_in + 1)² + d_out², d_in = C_in·k·k for convolutions), LAFTR's
    Bernoulli probabilities (one per ReLU output: per unit, or per channel and position in conv nets), the
    Gaussian input statistics (μ and the unique entries of Σ; diagonal Σ: 2D) and a coreset of ``n_coreset``
    inputs."""
    d = math.prod(in_shape)
    units = []
    hooks = [m.register_forward_hook(lambda m, i, o: units.append(o[0].numel()))
             for m in model.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model.eval()(torch.zeros(1, *in_shape, dtype=p.dtype, device=p.device))
    finally:
        for h in hooks:
            h.remove()
    kfac = 0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            kfac += (m.in_features + (m.bias is not None)) ** 2 + m.out_features ** 2
        elif isinstance(m, nn.Conv2d):
            kfac += (m.in_channels * math.prod(m.kernel_size) + (m.bias is not None)) ** 2 + m.out_channels ** 2
    return {"parameters (diagonal Fisher)": sum(p.numel() for p in model.parameters()), "K-FAC factors": kfac,
            "LAFTR Bernoulli probabilities": sum(units), "Gaussian inputs (full covariance)": d + d * (d + 1) // 2,
            "Gaussian inputs (diagonal)": 2 * d, "coreset": n_coreset * d}
