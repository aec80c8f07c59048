r"""Which per-example score predicts what: the four papers' quantities and dattri's attribution methods, scored on one
trained model and judged on one retraining ground truth.

**Scores.** A *train × test score* ``S`` (N, M): ``S[i, j]`` predicts how much test example j's loss rises when
training example i is removed (positive: i helps j). A *self score* ``s`` (N,): larger means more suspect (a
flipped label). :func:`scores` is the one entry point, by method name (:data:`METHODS`):

- ``mpe-full``, ``mpe-kfac``, ``mpe-diag`` (MPE, Nickl et al.): removing i moves the MAP by
  θ_{\i} − θ_* ≈ S⁻¹ ∇ℓ_i (the memory-perturbation equation at ε_i = −1, S the Laplace GGN precision Σ_i G_i + δI
  of :mod:`mpe.curvature`), so ΔL_j ≈ ∇ℓ_jᵀ S⁻¹ ∇ℓ_i; ``mpe-iblr`` the same with iBLR's own diagonal variance,
  IVON's Hessian estimated at the trained model (:func:`mpe.sensitivity.iblr_posterior`);
- ``pbrf``, ``pbrf-laftr`` (Bae et al.; Dhawan et al.): the proximal Bregman response function of removing i,
  solved from θ_* with the full-data KL as its data term, or with LAFTR's data-free estimate of it
  (:func:`pbrf_scores`; one L-BFGS solve per scored row, so only the rows asked for);
- ``lpntk`` (Guo et al.): the labelled-pair kernel κ(x_i, y_i; x_j, y_j) of :func:`mpe.kernels.features`, the
  first-order effect of a gradient step on i on the loss of j, without curvature;
- ``if-explicit``, ``if-cg``, ``if-lissa``, ``if-arnoldi``, ``tracin``, ``grad-dot``, ``grad-cos``, ``trak``: the
  implementations of `dattri <https://github.com/TRAIS-Lab/dattri>`_ (an optional dependency, ``pip install
  dattri``), nothing rewritten here.

**Ground truth** (:func:`loo_truth`, :func:`lds_truth`; dattri's protocol). Every model is trained with one fixed
minibatch order (the seeded permutation :func:`order`, no reshuffling between epochs); a retrain without some
examples keeps the order of the others, so that a change of test loss is the examples' effect and not a new
minibatch order. Retrains are jobs of :func:`mpe.retrain.fit_subset`: cached, resumable, vectorised, Dask-ready.

- LOO: ΔL[i, j] = L_j(θ_{\i}) − L_j(θ_*) for a sample of removed examples i;
- LDS: L_j(θ_T) for random subsets T holding a fraction of the training set.

**Metrics** (:func:`evaluate`, with dattri's :mod:`dattri.metric` where it is installed): LOO correlation = Pearson
between S[i, j] and ΔL[i, j] over removed i, per test example; LDS = Spearman between −Σ_{i∈T} S[i, j] and L_j(θ_T)
over subsets T, per test example; both averaged over test examples, with a bootstrap interval over them.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import curvature as C
from .retrain import fit_subset, run_specs

__all__ = ["METHODS", "DATTRI", "SELF", "DYNAMICS", "self_scores", "dynamics_scores", "order", "base_spec",
           "reference_models", "loo_truth", "lds_subsets", "lds_truth", "scores", "posterior_solve", "mpe_scores",
           "lpntk_scores", "dattri_scores", "evaluate"]

OURS = ("mpe-full", "mpe-kfac", "mpe-diag", "mpe-iblr", "lpntk", "pbrf", "pbrf-laftr")
DATTRI = ("if-explicit", "if-cg", "if-lissa", "if-arnoldi", "tracin", "grad-dot", "grad-cos", "trak")
METHODS = OURS + DATTRI
SELF = ("loss", "mpe-sensitivity", "mpe-self", "grad-dot", "trak")  # self scores for flipped labels (larger: suspect)
DYNAMICS = ("forgetting", "cbtl", "el2n")  # the same, read from the training run (dynamics_scores)


# ---------------------------------------------------------------------------------------------------------------
# Ground truth: retraining jobs in one fixed minibatch order
# ---------------------------------------------------------------------------------------------------------------
def order(n: int, seed: int = 0) -> list[int]:
    """The fixed minibatch order of every run of one ground truth: a seeded permutation of 0..n-1."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def base_spec(data: dict, model: dict, train: dict, seed: int = 0, device: str = "cpu") -> dict:
    """A :func:`mpe.retrain.fit_subset` spec without its subset: ``train`` must not reshuffle (``shuffle: False``),
    since the ground truth's retrains differ from the reference run only by the examples they leave out."""
    if train.get("shuffle", True):
        raise ValueError("the ground truth trains in one fixed order: pass train=dict(..., shuffle=False)")
    return {"data": data, "model": model, "seed": seed, "train": train, "evaluate": "test_loss", "device": device}


def _without(base: dict, perm: list[int], drop, evaluate: str = "test_loss") -> dict:
    drop = set(drop)
    return dict(base, kept=[i for i in perm if i not in drop], evaluate=evaluate)


def reference_models(base: dict, perms: list[list[int]], cache=None, executor=None):
    """The models trained on all the data in each order of ``perms`` (the reference θ_*, and the checkpoints of
    ensembles such as TRAK-k), by the same jobs as the ground truth, cached: a list of modules in eval mode. Each run
    also records its training dynamics, which :func:`dynamics_scores` reads back from the cache without training again."""
    from .data import from_spec
    from .models import get_model
    from .train import set_flat_params

    data = from_spec(base["data"])
    runs = run_specs(fit_subset, [_without(dict(base, seed=base["seed"] + k), p, (), "reference")
                                  for k, p in enumerate(perms)], cache, executor, desc="reference models")
    out = []
    kw = {k: v for k, v in base["model"].items() if k not in ("name", "seed")}
    for r in runs:
        net = get_model(base["model"]["name"], data.shape, data.n_classes, seed=0, **kw)
        set_flat_params(net, r["parameters"])
        with torch.no_grad():  # batch-norm statistics
            for b, v in zip(net.buffers(), r["buffers"], strict=True):
                b.copy_(v)
        out.append(net.to(base.get("device", "cpu")).eval())
    return out


def loo_truth(base: dict, perm: list[int], removed, cache=None, executor=None, progress: bool = True):
    """(ΔL (k, M), removed (k,)): the change of every test loss when each example of ``removed`` is left out."""
    removed = [int(i) for i in removed]
    specs = [_without(base, perm, ())] + [_without(base, perm, [i]) for i in removed]
    losses = run_specs(fit_subset, specs, cache, executor, progress=progress, desc="leave-one-out retrains")
    return torch.stack(losses[1:]) - losses[0], torch.tensor(removed)


def dynamics_scores(base: dict, perm: list[int], *, el2n_epochs: int = 2, cache=None, executor=None) -> dict:
    """Self scores read from training itself, (N,) each and larger for a more suspect label (:data:`DYNAMICS`): the
    reference run of ``base`` in the order ``perm`` (the run of :func:`reference_models`), retraced with every
    example recorded at each visit, before the update on its minibatch.

    - ``forgetting``: Toneva et al.'s forgetting events, never-learned examples counted as the number of epochs (her
      rule for ranking);
    - ``cbtl``: the number of visits at which the example was misclassified: epochs minus the regularity paper's CBTL;
    - ``el2n``: Paul et al.'s EL2N ‖softmax(f) − e_y‖ at the visit of epoch ``el2n_epochs`` (their score early in
      training)."""
    from .regularity import regularity

    run, = run_specs(fit_subset, [_without(base, perm, (), "reference")], cache, executor, desc="training dynamics")
    correct, el2n = run["visit_correct"], run["el2n_history"]
    if not 1 <= el2n_epochs <= len(el2n):
        raise ValueError(f"el2n_epochs must lie in [1, {len(el2n)}] (the run's epochs), got {el2n_epochs}")
    r, where = regularity(correct), torch.as_tensor(perm)  # position k of the run is training example perm[k]

    def by_example(v):
        out = torch.empty_like(v)
        out[where] = v
        return out.double()

    return {"forgetting": by_example(r["events_for_sorting"]), "cbtl": by_example(len(correct) - r["cb"]),
            "el2n": by_example(el2n[el2n_epochs - 1])}


def lds_subsets(n: int, n_subsets: int = 100, fraction: float = 0.5, seed: int = 0) -> torch.Tensor:
    """(n_subsets, round(fraction n)) sorted random subsets of 0..n-1 (dattri: 100 subsets of half the data)."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}")
    g = torch.Generator().manual_seed(seed)
    k = round(fraction * n)
    return torch.stack([torch.randperm(n, generator=g)[:k].sort().values for _ in range(n_subsets)])


def lds_truth(base: dict, perm: list[int], subsets: torch.Tensor, cache=None, executor=None, progress: bool = True):
    """(L (S, M), subsets (S, k)): the test losses of the models trained on each subset, in the order ``perm``."""
    n = len(perm)
    specs = [_without(base, perm, sorted(set(range(n)) - set(s.tolist()))) for s in subsets]
    return torch.stack(run_specs(fit_subset, specs, cache, executor, progress=progress, desc="LDS retrains")), subsets


# ---------------------------------------------------------------------------------------------------------------
# Scores
# ---------------------------------------------------------------------------------------------------------------
def posterior_solve(model, posterior: C.Posterior, v: torch.Tensor) -> torch.Tensor:
    """S⁻¹ vᵀ for rows v (R, P) in parameter order, for a full, diagonal or K-FAC posterior precision S; (R, P)."""
    if posterior.kind == "diag":
        return v / posterior.data
    if posterior.kind == "full":
        return torch.cholesky_solve(v.T.to(posterior.data.dtype), torch.linalg.cholesky(posterior.data)).T.to(v.dtype)
    if posterior.kind != "kfac":
        raise ValueError(f"unknown posterior kind {posterior.kind!r}; valid: full, diag, kfac")
    layers = C._layers(model)
    # per layer, the precision is diagonal in the Kronecker eigenbasis (U_G ⊗ U_A): rotate, divide, rotate back
    return C._to_flat(layers, [Ug @ ((Ug.T @ d @ Ua) / (lg[:, None] * la[None, :] / count + posterior.delta)) @ Ua.T
                               for d, (Ua, la, Ug, lg, count) in zip(C._from_flat(layers, v), posterior.data)])


def mpe_scores(model, x, y, x_test, y_test, *, posterior: str = "full", delta: float, chunk: int = 1024, **kw):
    """S[i, j] = ∇ℓ_jᵀ S⁻¹ ∇ℓ_i (N, M): the MPE's parameter shift of removing example i, read through test example
    j's loss; S the Laplace GGN posterior precision of ``posterior`` ("full", "kfac", "diag") with prior δ, or
    ("iblr") IVON's own diagonal variance at the model (:func:`mpe.sensitivity.iblr_posterior`, keywords ``kw``)."""
    if posterior == "iblr":
        from .sensitivity import iblr_posterior

        post = iblr_posterior(model, x, y, delta, **kw)
    elif kw:
        raise TypeError(f"unexpected keywords {sorted(kw)} for the {posterior!r} posterior")
    else:
        post = C.laplace_posterior(posterior, model, x, delta)
    g_test = posterior_solve(model, post, C.per_example_grads(model, x_test, y_test))  # (M, P)
    return torch.cat([C.per_example_grads(model, x[s:s + chunk], y[s:s + chunk]) @ g_test.T
                      for s in range(0, len(x), chunk)])


def lpntk_scores(model, x, y, x_test, y_test, sketch: int | None = None):
    """S[i, j] = κ_lpNTK((x_i, y_i), (x_j, y_j)) (N, M), the labelled-pair NTK of :func:`mpe.kernels.features`;
    ``sketch``: through a count sketch of that width (large models: the exact features are N × P)."""
    from .kernels import features, gram

    return gram(features(model, x, y, sketch=sketch), features(model, x_test, y_test, sketch=sketch))


def pbrf_scores(model, x, y, x_test, y_test, *, damping: float, rows=None, term: str = "true", steps: int = 50,
                n_samples: int = 2000, seed: int = 0, eps: float | None = None, progress: bool = False):
    """S[i, j] = (L_j(θ_i) − L_j(θ_*)) / (εN) (N, M) for the training examples ``rows`` (default: all; NaN elsewhere),
    θ_i the PBRF of removing i (:func:`mpe.influence.pbrf` on the mean-loss scale, ε = 1/N unless given: one
    example's weight; proximal damping ``damping``; in float64) with the data term ``term`` of
    :func:`mpe.influence.data_terms` ("true": the KL over the training inputs; "laftr": LAFTR's estimate from
    ``n_samples`` Gaussian inputs). A diverged solve leaves its row NaN."""
    from .influence import data_terms, pbrf

    net = copy.deepcopy(model).double().eval()
    x, x_test = x.double(), x_test.double()
    data_term = data_terms(net, x, [term], n_samples=n_samples, seed=seed)[term]
    rows = range(len(x)) if rows is None else [int(i) for i in rows]
    with torch.no_grad():
        base = F.cross_entropy(net(x_test), y_test, reduction="none")
    out = torch.full((len(x), len(x_test)), float("nan"), dtype=torch.float64)
    if progress:
        from tqdm.auto import tqdm

        rows = tqdm(rows, desc=f"PBRF solves ({term})", leave=False)
    eps = 1 / len(x) if eps is None else eps
    for i in rows:
        solved = pbrf(net, x[i:i + 1], y[i:i + 1], data_term, eps=eps, damping=damping, steps=steps)
        if not solved.pbrf["diverged"]:
            with torch.no_grad():
                out[i] = (F.cross_entropy(solved(x_test), y_test, reduction="none") - base) / (eps * len(x))
    return out


def _dattri_task(model, checkpoints):
    from dattri.task import AttributionTask
    from torch.func import functional_call

    def loss(params, batch):  # one example (dattri vmaps it) or a batch; dattri's LiSSA needs the .long()
        xb, yb = batch
        single = yb.dim() == 0
        logits = functional_call(model, params, (xb.unsqueeze(0) if single else xb,))
        return F.cross_entropy(logits, (yb.unsqueeze(0) if single else yb).long())

    return AttributionTask(loss_func=loss, model=model, checkpoints=checkpoints), loss


def dattri_scores(method: str, models, x, y, x_test, y_test, *, regularization: float = 0.0, batch_size: int = 500,
                  test_batch_size: int = 16, proj_dim: int = 512, **kw):
    """S (N, M) of a dattri method on ``models`` (one module, or several checkpoints for TracIn / TRAK-k).

    dattri's inner-product attributors return ∇ℓ_iᵀ H⁻¹ ∇ℓ_j (positive: i helps j), which is already this module's
    convention; ``regularization`` is the λ of H + λI (dattri's own name). TRAK scores are ensembled over the
    checkpoints; TracIn sums over them with unit weights (``grad-dot`` and ``grad-cos`` take the last one). TracIn,
    Grad-Dot, Grad-Cos and TRAK project the gradients to ``proj_dim`` random directions first (dattri's default 512,
    seed 0).

    The influence functions (``if-*``) take all training examples in one batch where their per-example gradients fit
    in 2 GB (float32), else batches of ``batch_size``, and test examples in batches of ``test_batch_size``: dattri's
    loop over training batches is the outer one, so each test example's inverse-Hessian product is solved once per
    training batch, and the solve is vmapped over a test batch (dattri's MLP, 4,000 training and 100 test images in
    batches of 500: IF-CG took 552 s and 13 GB). The scores do not depend on the batches."""
    try:
        from dattri import algorithm as A
    except ImportError as err:
        raise ImportError("dattri is needed for the methods " + ", ".join(DATTRI) + ": pip install 'mpe[peers]' "
                          "(or pip install dattri)") from err
    from torch.utils.data import DataLoader, TensorDataset

    models = models if isinstance(models, (list, tuple)) else [models]
    # dattri loads each checkpoint into its task's model in place: give it a copy of the first model, and checkpoints
    # (parameters and buffers: batch-norm statistics) that share no tensors with it, or the first checkpoint would be
    # overwritten by the others (its train and test gradients then from different models) and so would the caller's model
    model = copy.deepcopy(models[0])
    ckpts = [{k: v.clone() for k, v in m.state_dict().items()} for m in models]
    if method in ("grad-dot", "grad-cos"):
        ckpts = ckpts[-1:]
    task, loss = _dattri_task(model, ckpts if len(ckpts) > 1 else ckpts[0])
    if method.startswith("if-"):
        n_params = sum(p.numel() for p in model.parameters())
        train_batch, test_batch = max(batch_size, min(len(x), 2 ** 29 // n_params)), test_batch_size
    else:
        train_batch, test_batch = batch_size, batch_size
    train = DataLoader(TensorDataset(x, y), batch_size=train_batch, shuffle=False)
    test = DataLoader(TensorDataset(x_test, y_test), batch_size=test_batch, shuffle=False)
    dev = str(next(model.parameters()).device)
    if method == "if-explicit":
        att = A.IFAttributorExplicit(task, device=dev, regularization=regularization)
    elif method == "if-cg":
        att = A.IFAttributorCG(task, device=dev, regularization=regularization, **kw)
    elif method == "if-lissa":
        att = A.IFAttributorLiSSA(task, device=dev, **kw)
    elif method == "if-arnoldi":
        att = A.IFAttributorArnoldi(task, device=dev, regularization=regularization, **kw)
    elif method in ("tracin", "grad-dot", "grad-cos"):
        att = A.TracInAttributor(task, weight_list=torch.ones(len(task.get_checkpoints())),
                                 normalized_grad=method == "grad-cos", device=dev, projector_kwargs=_projector(proj_dim, dev))
    elif method == "trak":
        def p_correct(params, batch):
            xb, yb = batch
            return torch.exp(-loss(params, (xb, yb)))

        att = A.TRAKAttributor(task, correct_probability_func=p_correct, device=dev, regularization=regularization,
                               projector_kwargs={"proj_dim": proj_dim, "device": dev, **kw.pop("projector_kwargs", {})})
    else:
        raise ValueError(f"unknown dattri method {method!r}; valid choices: {', '.join(DATTRI)}")
    with _quiet_dattri():
        if method == "trak":
            att.cache(train)
            return att.attribute(test).detach().cpu()
        if method not in ("tracin", "grad-dot", "grad-cos"):
            # the curvature from all of the training set at once: dattri sums its inverse-Hessian products over the
            # batches of this loader, Σ_b H_b⁻¹ g, which is not (Σ_b H_b)⁻¹ g unless there is one batch
            att.cache(DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=False))
        return att.attribute(train, test).detach().cpu()


def _projector(proj_dim: int, device: str) -> dict:
    """TracIn's projection settings, every one given: dattri 0.3.0 updates its module-level defaults in place with
    what it is passed (so a value left out is the last call's), and their device is "cpu" whatever the model's."""
    return {"proj_dim": proj_dim, "proj_max_batch_size": 32, "proj_seed": 0, "device": device}


@contextlib.contextmanager
def _quiet_dattri():
    """Turn off the progress bars of dattri's attributors while they run: nested bars with ``leave=False`` write
    cursor-up codes, which end up as lines of "[A" in a notebook's stored output."""
    import sys

    from tqdm import tqdm

    modules = [m for name, m in list(sys.modules.items()) if name.startswith("dattri.") and getattr(m, "tqdm", None) is tqdm]
    for m in modules:
        m.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        for m in modules:
            m.tqdm = tqdm


def scores(method: str, model, x, y, x_test, y_test, **kw) -> tuple[torch.Tensor, float]:
    """(S (N, M), seconds): the train × test score of ``method`` (one of :data:`METHODS`) for ``model`` (a module; for
    TracIn and TRAK-k also a list of checkpoints, the first being the reference model)."""
    t = time.perf_counter()
    if method.startswith("mpe-"):
        s = mpe_scores(_first(model), x, y, x_test, y_test, posterior=method[4:], **kw)
    elif method in ("pbrf", "pbrf-laftr"):
        s = pbrf_scores(_first(model), x, y, x_test, y_test, term="true" if method == "pbrf" else "laftr", **kw)
    elif method == "lpntk":
        s = lpntk_scores(_first(model), x, y, x_test, y_test, **kw)
    elif method in DATTRI:
        s = dattri_scores(method, model, x, y, x_test, y_test, **kw)
    else:
        raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
    return s.detach().cpu().double(), time.perf_counter() - t


def self_scores(method: str, model, x, y, *, delta: float | None = None, batch_size: int = 500,
                proj_dim: int = 512) -> tuple[torch.Tensor, float]:
    """(s (N,), seconds): a self score of every training example, larger for a more suspect label (:data:`SELF`).

    ``loss``: the training loss; ``mpe-sensitivity``: the MPE's sensitivity Σ_k |Δp_ik| (Eq. 13, K-FAC posterior of
    prior ``delta``); ``mpe-self``: its self-influence ∇ℓ_iᵀ S⁻¹ ∇ℓ_i; ``grad-dot``, ``trak``: dattri's
    ``self_attribute`` (TracIn at the final checkpoint, and TRAK with one checkpoint)."""
    from .sensitivity import residuals, sensitivity

    t = time.perf_counter()
    with torch.no_grad():
        logits = model(x)
    if method == "loss":
        s = F.cross_entropy(logits, y, reduction="none")
    elif method in ("mpe-sensitivity", "mpe-self"):
        if delta is None:
            raise ValueError(f"self score {method!r} needs the prior precision delta of the Laplace posterior")
        post = C.laplace_posterior("kfac", model, x, delta)
        if method == "mpe-sensitivity":
            s = sensitivity(torch.softmax(logits, 1), C.predictive_covariance(model, x, post), residuals(logits, y))
        else:
            s = torch.cat([(g * posterior_solve(model, post, g)).sum(1) for g in
                           (C.per_example_grads(model, x[i:i + batch_size], y[i:i + batch_size])
                            for i in range(0, len(x), batch_size))])
    elif method in ("grad-dot", "trak"):
        from dattri import algorithm as A
        from torch.utils.data import DataLoader, TensorDataset

        task, loss = _dattri_task(model, {k: v.clone() for k, v in model.state_dict().items()})
        train = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)
        dev = str(next(model.parameters()).device)
        if method == "grad-dot":
            att = A.TracInAttributor(task, weight_list=torch.ones(1), normalized_grad=False, device=dev,
                                     projector_kwargs=_projector(proj_dim, dev))
        else:
            att = A.TRAKAttributor(task, correct_probability_func=lambda p, b: torch.exp(-loss(p, b)), device=dev,
                                   projector_kwargs={"proj_dim": proj_dim, "device": dev})
        with _quiet_dattri():
            s = att.self_attribute(train)  # TRAK without .cache(): dattri 0.3.0's self_attribute() after it fails
    else:
        raise ValueError(f"unknown self score {method!r}; valid choices: {', '.join(SELF)}")
    return s.detach().cpu().double().reshape(len(x)), time.perf_counter() - t  # dattri's TRAK gives (N, 1)


def _first(model):
    return model[0] if isinstance(model, (list, tuple)) else model


# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------
def _rank(a: np.ndarray) -> np.ndarray:
    """Ranks along axis 0 (ties broken by order; scores and losses are continuous)."""
    return np.argsort(np.argsort(a, axis=0), axis=0).astype(float)


def _columnwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(0)
    b = b - b.mean(0)
    return (a * b).sum(0) / np.sqrt((a * a).sum(0) * (b * b).sum(0))


def per_test_correlations(score: torch.Tensor, truth: tuple, kind: str) -> np.ndarray:
    """(M,) the per-test-example correlation of a score with a ground truth: ``kind`` "loo" (Pearson of S[removed]
    with ΔL) or "lds" (Spearman of −Σ_{i∈T} S[i] with L_T). Equal to dattri's ``loo_corr`` / ``lds``."""
    values, idx = (t.detach().cpu().double().numpy() for t in truth)
    s = score.detach().cpu().double().numpy()
    if kind == "loo":
        return _columnwise_pearson(s[idx.astype(int)], values)
    if kind == "lds":
        predicted = -np.stack([s[row.astype(int)].sum(0) for row in idx])  # (S, M): more help, lower loss
        r = _columnwise_pearson(_rank(predicted), _rank(values))
        return np.where(np.isfinite(predicted).all(0), r, np.nan)  # a score missing in a subset (NaN rows): none
    raise ValueError(f"unknown kind {kind!r}; valid: loo, lds")


def truth_agreement(a: torch.Tensor, b: torch.Tensor, kind: str) -> np.ndarray:
    """(M,) how well two ground truths of the same removals agree (e.g. retrained in two minibatch orders), per test
    example: Pearson over removed examples of ΔL (k, M) for ``kind`` "loo", Spearman over subsets of L_T (S, M) for
    "lds", as the metrics read a score. If both are one signal plus independent noise and agree at r, the signal
    itself reaches √r against either: the ceiling of a score."""
    a, b = (t.detach().cpu().double().numpy() for t in (a, b))
    if kind == "loo":
        return _columnwise_pearson(a, b)
    if kind == "lds":
        return _columnwise_pearson(_rank(a), _rank(b))
    raise ValueError(f"unknown kind {kind!r}; valid: loo, lds")


def evaluate(score: torch.Tensor, truth: tuple, kind: str, n_boot: int = 1000, seed: int = 0):
    """The mean over test examples of :func:`per_test_correlations`, with a bootstrap interval over test examples
    (:class:`mpe.stats.Estimate`). Test examples whose ground truth does not vary are left out (NaN correlation)."""
    from .stats import Estimate, bootstrap


    r = per_test_correlations(score, truth, kind)
    r = r[np.isfinite(r)]
    if len(r) == 0:  # a score that is NaN or constant everywhere (a diverged solver): no evidence at all
        return Estimate(float("nan"), float("nan"), float("nan"), "no finite correlation")
    return bootstrap(np.mean, r, n_boot=n_boot, seed=seed, what="test examples")
