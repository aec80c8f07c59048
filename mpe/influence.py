r"""Influence through the proximal Bregman response function (PBRF; Bae et al. 2022), with the data term replaced by
a function-space-distance estimate (LAFTR paper, notes §1.11).

For trained parameters θˢ and a training example z_m = (x_m, y_m),

    θ_m = argmin_θ  D(θˢ, θ) − ε L(f(x_m, θ), y_m) + (λ/2) ‖θ − θˢ‖²,

where the data term D is the mean Bregman divergence of the loss over the training inputs — for softmax
cross-entropy exactly the KL FSD (:func:`mpe.fsd.fsd`) — and ε = 1/N removes z_m. Replacing D by a cheap FSD
estimate (the parametric LAFTR, EWC / K-FAC quadratics, the FSD on a stored subset) avoids iterating over the data
set in every solve. The influence on a measurement is its change from θˢ to θ_m; the *self-influence*
L(f(x_m, θ_m), y_m) − L(f(x_m, θˢ), y_m) ranks examples that the network memorised, such as mislabeled ones.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pbrf", "self_influence", "DATA_TERMS", "data_terms"]

DATA_TERMS = ("true", "laftr", "laftr_data", "ewc", "kfac", "subset")


def pbrf(model: nn.Module, x_m: torch.Tensor, y_m: torch.Tensor, data_term, *, eps: float, damping: float = 1e-3,
         steps: int = 50) -> nn.Module:
    r"""Solve the PBRF for the example(s) (x_m (B, ...), y_m (B,)) from θˢ = ``model``'s parameters with L-BFGS
    (``steps`` iterations, strong-Wolfe line search); ``data_term(net) -> scalar`` must be deterministic (fix any
    samples). Returns a new model at θ_m; ``model`` is not changed."""
    if eps <= 0 or damping < 0 or steps < 1:
        raise ValueError(f"need eps > 0, damping >= 0 and steps >= 1, got {eps}, {damping}, {steps}")
    net = copy.deepcopy(model).eval()
    theta_s = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.LBFGS(net.parameters(), max_iter=steps, history_size=20, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-10, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        prox = sum(((p - p0) ** 2).sum() for p, p0 in zip(net.parameters(), theta_s))
        obj = data_term(net) - eps * F.cross_entropy(net(x_m), y_m, reduction="sum") + 0.5 * damping * prox
        obj.backward()
        return obj

    opt.step(closure)
    return net


@torch.no_grad()
def _loss(net, x, y):
    return F.cross_entropy(net(x), y, reduction="none")


def self_influence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, make_term, *, eps: float,
                   damping: float = 1e-3, steps: int = 50, progress: bool = False) -> torch.Tensor:
    """Self-influence (N,) of each example of (x, y): the rise of its own loss at its PBRF solution.
    ``make_term(i) -> data_term`` builds the data term for example i (e.g. the same estimate for all)."""
    model.eval()
    base = _loss(model, x, y)
    out = torch.empty(len(x))
    it = range(len(x))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="PBRF solves", leave=False)
    for i in it:
        net = pbrf(model, x[i:i + 1], y[i:i + 1], make_term(i), eps=eps, damping=damping, steps=steps)
        out[i] = _loss(net, x[i:i + 1], y[i:i + 1])[0] - base[i]
    return out


def data_terms(model: nn.Module, x: torch.Tensor, names=DATA_TERMS, *, n_samples: int = 2000, n_subset: int = 40,
               seed: int = 0) -> dict:
    """Deterministic PBRF data terms ``{name: term(net)}`` around θˢ = ``model`` on the training inputs x, from
    :func:`mpe.fsd.estimator` with fixed samples and gates: ``true`` (the KL FSD over all of x: the ground truth),
    ``laftr`` (parametric, ``n_samples`` Gaussian inputs), ``laftr_data`` (true gates on x), ``ewc``, ``kfac`` and
    ``subset`` (the exact KL on ``n_subset`` stored inputs)."""
    from . import fsd

    old = copy.deepcopy(model).eval()
    g = torch.Generator().manual_seed(seed)
    terms = {}
    for name in names:
        if name not in DATA_TERMS:
            raise ValueError(f"unknown data term {name!r}; valid choices: {', '.join(DATA_TERMS)}")
        terms[name] = fsd.estimator("coreset" if name == "subset" else name, old, x, n_samples=n_samples,
                                    n_coreset=n_subset, resample=False, generator=g)
    return terms
