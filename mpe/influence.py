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

import contextlib
import copy
import functools
import json
import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["pbrf", "self_influence", "DATA_TERMS", "data_terms", "fitted", "pbrf_job"]

DATA_TERMS = ("true", "laftr", "laftr_data", "ewc", "kfac", "subset")


def pbrf(model: nn.Module, x_m: torch.Tensor, y_m: torch.Tensor, data_term, *, eps: float, damping: float = 1e-3,
         steps: int = 50) -> nn.Module:
    r"""Solve the PBRF for the example(s) (x_m (B, ...), y_m (B,)) from θˢ = ``model``'s parameters; ``data_term(net)
    -> scalar`` must be deterministic (fix any samples). Returns a new model at θ_m (``model`` is not changed) with
    ``net.pbrf`` = {"route", "grad_ratio", "step", "bound", "diverged", "linear_change"} (the last: gᵀΔθ for the
    linear response, else None).

    - A quadratic data term ½ΔθᵀĜΔθ (EWC, K-FAC: it has ``data_term.solve``) makes the objective unbounded below for
      a multi-layer net — the logits grow faster than quadratically in Δθ, so −εL falls faster than the term rises.
      Its PBRF is then taken with the loss linearised at θˢ (linear response), exactly:
      Δθ = ε (Ĝ + λI)⁻¹ g, g = ∇_θ L(x_m, y_m; θˢ).
    - Any other term: L-BFGS (``steps`` iterations, strong-Wolfe line search, a history of 100 pairs) in the
      variables u = Δθ / r on the objective divided by g₀r, where g₀ = ε‖g‖ is its gradient at θˢ and r = g₀/λ the
      longest step a convex data term allows: the gradient in u starts at norm 1 and the answer is of size ≤ 1 for
      every example, so that L-BFGS's absolute tolerances and its first step mean the same for each. In θ itself a
      confident example's objective moves by 1e-15 or less and L-BFGS stopped near its start, leaving self-influences
      10-100x too small (digits MLP, LAFTR's term; `tests/test_influence.py`). The objective is unbounded below for
      a multi-layer net with these terms too (the logits grow polynomially in Δθ, the proximal term quadratically),
      and L-BFGS can run away along such a direction: a solve that ends outside the radius 10 ε‖g‖/λ (ε‖g‖/λ bounds
      the step for any convex data term) counts as diverged.

    Checks at the returned point: ``grad_ratio`` = ‖∇obj(θ_m)‖ / ‖∇obj(θˢ)‖ (small at a converged L-BFGS solve),
    and ``diverged`` when the solve ended outside that radius or a value is not finite."""
    if eps <= 0 or damping < 0 or steps < 1:
        raise ValueError(f"need eps > 0, damping >= 0 and steps >= 1, got {eps}, {damping}, {steps}")
    net = copy.deepcopy(model).eval()
    theta_s = [p.detach().clone() for p in model.parameters()]

    def objective():
        prox = sum(((p - p0) ** 2).sum() for p, p0 in zip(net.parameters(), theta_s))
        return data_term(net) - eps * F.cross_entropy(net(x_m), y_m, reduction="sum") + 0.5 * damping * prox

    def grad_norm():
        net.zero_grad()
        objective().backward()
        return torch.sqrt(sum((p.grad ** 2).sum() for p in net.parameters())).item()

    g = torch.autograd.grad(F.cross_entropy(net(x_m), y_m, reduction="sum"), list(net.parameters()))
    g = torch.cat([t.reshape(-1) for t in g])
    g0 = eps * g.norm().item()  # ‖∇obj(θˢ)‖: the data term and the proximal term are flat there
    solve = getattr(data_term, "solve", None)
    if solve is not None:
        route = "linear response"
        step = eps * solve(g, damping)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(theta_s) + step, net.parameters())
    else:
        route = "L-BFGS"
        if any(p.dtype != torch.float64 for p in net.parameters()):
            # at ε = 1/N the objective's change per step is near float32's resolution of the data term: L-BFGS stops
            # near θˢ and the solve looks fine but is not (MNIST logistic regression, 50 steps: gradient ratio
            # 0.85-1.0 and a step 10x too short in float32; 0.004 and the linear response's step in float64)
            raise ValueError("the PBRF's L-BFGS solve needs a float64 model (model.double(), and data terms built "
                             "on it): in float32 it stops near its start at small eps")
        flat_s = torch.nn.utils.parameters_to_vector(theta_s)
        r = (g0 / damping if damping > 0 else 1.0) or 1.0  # the natural length of the step (see above)
        scale = (g0 * r) or 1.0
        u = torch.zeros_like(flat_s, requires_grad=True)
        opt = torch.optim.LBFGS([u], max_iter=steps, history_size=100, line_search_fn="strong_wolfe",
                                tolerance_grad=1e-10, tolerance_change=1e-14)

        def closure():  # θ = θˢ + r u, and ∂obj/∂u = r ∂obj/∂θ
            with torch.no_grad():
                torch.nn.utils.vector_to_parameters(flat_s + r * u, net.parameters())
            net.zero_grad()
            obj = objective() / scale
            obj.backward()
            u.grad = r * torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                    for p in net.parameters()])
            return obj.detach()

        opt.step(closure)
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(flat_s + r * u, net.parameters())
    with torch.no_grad():
        moved = torch.sqrt(sum(((p - p0) ** 2).sum() for p, p0 in zip(net.parameters(), theta_s))).item()
    bound = g0 / damping if damping > 0 else float("inf")
    ratio = grad_norm() / g0 if g0 > 0 else 0.0
    net.zero_grad(set_to_none=True)
    net.pbrf = dict(route=route, grad_ratio=ratio, step=moved, bound=bound,
                    diverged=not (math.isfinite(moved) and math.isfinite(ratio) and moved <= 10 * bound),
                    linear_change=(g @ step).item() if solve is not None else None)  # gᵀΔθ: the loss change to first order
    return net


@torch.no_grad()
def _loss(net, x, y):
    return F.cross_entropy(net(x), y, reduction="none")


def self_influence(model: nn.Module, x: torch.Tensor, y: torch.Tensor, make_term, *, eps: float,
                   damping: float = 1e-3, steps: int = 50, progress: bool = False, report: dict | None = None
                   ) -> torch.Tensor:
    """Self-influence (N,) of each example of (x, y): the rise of its own loss at its PBRF solution (:func:`pbrf`) —
    for a quadratic data term the linear response ε gᵀ(Ĝ + λI)⁻¹g — and NaN where the solve diverged.
    ``make_term(i) -> data_term`` builds the data term for example i (e.g. the same estimate for all). ``report``, if
    given, receives the per-example checks: "grad_ratio" (N,), "diverged" (N,) bool and "route"."""
    model.eval()
    base = _loss(model, x, y)
    out, ratio = torch.empty(len(x)), torch.empty(len(x), dtype=torch.float64)
    diverged = torch.zeros(len(x), dtype=torch.bool)
    it = range(len(x))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc="PBRF solves", leave=False)
    route = None
    for i in it:
        net = pbrf(model, x[i:i + 1], y[i:i + 1], make_term(i), eps=eps, damping=damping, steps=steps)
        info, route = net.pbrf, net.pbrf["route"]
        ratio[i], diverged[i] = info["grad_ratio"], info["diverged"]
        if info["diverged"]:
            out[i] = float("nan")
        elif info["linear_change"] is not None:  # linear response: ε gᵀ(Ĝ + λI)⁻¹g
            out[i] = info["linear_change"]
        else:
            out[i] = _loss(net, x[i:i + 1], y[i:i + 1])[0] - base[i]
    if report is not None:
        report.update(grad_ratio=ratio, diverged=diverged, route=route)
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


# ----------------------------------------------------------------------------------------------------------
# PBRF studies as jobs described by data
# ----------------------------------------------------------------------------------------------------------
STUDY_KEYS = ("data", "hidden", "fit_iters", "delta", "terms", "n_samples", "n_subset", "seed")


@contextlib.contextmanager
def _float64():
    """Tensors made inside default to float64 (the data terms' samples; the PBRF solve needs it), as in the notebooks."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def fitted(study: dict) -> tuple:
    """(data, network, data terms) of a PBRF study, rebuilt from its JSON description and kept for this process::

        {"data": {"name": "digits", "dtype": "float64"},  # mpe.data.from_spec (float64: the solves need it)
         "hidden": [64, 64],                  # a ReLU MLP, float64, initialised from "seed"
         "fit_iters": 300, "delta": 1.0,      # full-batch L-BFGS to θˢ, prior precision δ
         "terms": ["true", "laftr", ...],     # data_terms' names (their samples are drawn in this order)
         "n_samples": 2000, "n_subset": 40, "seed": 0}

    The notebook that sets up a study and the jobs that solve its PBRFs (:func:`pbrf_job`) share one fit; read the
    results, never change them in place."""
    from .retrain import check_spec

    check_spec(study, STUDY_KEYS, "PBRF study")
    return _fitted(json.dumps(study, sort_keys=True))


@functools.lru_cache(maxsize=2)
def _fitted(blob: str) -> tuple:
    from .data import from_spec
    from .models import get_model
    from .train import train

    study = json.loads(blob)
    data = from_spec(study["data"])
    if data.x_train.dtype != torch.float64:
        raise ValueError("a PBRF study needs float64 data: add \"dtype\": \"float64\" to its data spec")
    with _float64():
        net = get_model("mlp", data.shape, data.n_classes, seed=study["seed"], hidden=tuple(study["hidden"]),
                        activation="relu").double()
        train(net, data.x_train, data.y_train, optimizer="lbfgs", epochs=study["fit_iters"], lr=1.0,
              delta=study["delta"])
        terms = data_terms(net, data.x_train, study["terms"], n_samples=study["n_samples"],
                           n_subset=study["n_subset"], seed=study["seed"])
    return data, net, terms


def pbrf_job(spec: dict) -> dict:
    """The self-influences of one data term in a PBRF study, a job of :func:`mpe.retrain.run_specs`::

        {"study": {...},                      # see fitted()
         "term": "laftr",                     # one of the study's terms
         "examples": [3, 17, ...],            # training indices (None: all), ε = 1/N
         "damping": 0.001, "steps": 100}      # the solve's λ and L-BFGS iterations

    Returns {"influence" (M,), "diverged" (M,) bool, "grad_ratio" (M,), "route"} (:func:`self_influence`)."""
    from .retrain import check_spec

    check_spec(spec, ("study", "term", "examples", "damping", "steps"), "pbrf_job")
    data, net, terms = fitted(spec["study"])
    if spec["term"] not in terms:
        raise ValueError(f"term {spec['term']!r} is not one of the study's terms {list(terms)}")
    idx = slice(None) if spec["examples"] is None else torch.as_tensor(spec["examples"]).long()
    report = {}  # per-solve checks: did the solve leave the trust radius (diverge)? the gradient norm ratio
    with _float64():
        values = self_influence(net, data.x_train[idx], data.y_train[idx], lambda i: terms[spec["term"]],
                                eps=1 / len(data.y_train), damping=spec["damping"], steps=spec["steps"], report=report)
    return dict(influence=values, diverged=report["diverged"], grad_ratio=report["grad_ratio"], route=report["route"])
