r"""The memory-perturbation equation (MPE) for classifiers: sensitivity = prediction error × prediction variance.

For example i with logits f_i, probabilities p_i, one-hot label y_i and logit covariance V_i = J_i S⁻¹ J_iᵀ:

    e_i = p_i − y_i                                    prediction error ("residual")
    Δf_i = f_i(θ^{\i}) − f_i(θ) ≈ V_i e_i              Eq. 12
    Δp_i ≈ Λ_i V_i e_i,   Λ_i = diag(p_i) − p_i p_iᵀ    Eq. 13

Three forms of the estimate (``form=``):

- ``"diag"``   the official code's per-class form Δp_ik ≈ p_ik(1 − p_ik) v_ik e_ik with v_ik = [V_i]_kk
               (the paper's figures use it);
- ``"full"``   the K×K form Λ_i V_i e_i of Eq. 13;
- ``"newton"`` a one-Newton-step LOO that keeps S^{\i} = S − J_iᵀΛ_iJ_i (Woodbury): Δf_i = V_i (I − Λ_i V_i)⁻¹ e_i;
               for ridge regression it is the exact LOO, for a binary GLM it is v e / (1 − h) with leverage h = λ v.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from . import curvature as C
from .curvature import softmax_hessian
from .retrain import check_spec, retrained_outputs, run_specs, stash, unstash
from .train import nll_and_error, predict, train

__all__ = ["residuals", "logit_shift", "deviation", "sensitivity", "loo_nll", "leverage", "removal_truth",
           "removal_study", "loo_sweep", "LOOTracker", "loo_during_training", "loco_study", "group_deviation",
           "group_removal_truth", "group_removal_study", "sampled_residuals", "SensitivityTracker", "sorted_bins",
           "top_share", "FORMS", "matched_beta2", "hess_moved", "loo_gaps"]

FORMS = ("diag", "full", "newton")
_EPS = 1e-10


def _check_form(form):
    if form not in FORMS:
        raise ValueError(f"unknown form {form!r}; valid choices: {', '.join(FORMS)}")


def residuals(logits: torch.Tensor, y: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """e = softmax(f) − onehot(y), (N, K). ``clamp`` keeps |e| in [1e-10, 1 − 1e-10] as the official code does."""
    e = torch.softmax(logits, 1) - F.one_hot(y.to(logits.device), logits.shape[1]).to(logits.dtype)
    if clamp:
        e = torch.where(e >= 0, e.clamp(_EPS, 1 - _EPS), e.clamp(-(1 - _EPS), -_EPS))
    return e


def logit_shift(V: torch.Tensor, e: torch.Tensor, p: torch.Tensor | None = None, form: str = "diag") -> torch.Tensor:
    """Estimated Δf_i = f_i(θ^{\\i}) − f_i(θ), (N, K). ``V`` (N, K, K); ``p`` is needed for ``form="newton"``, which
    is NaN where the leverage h_i ≥ 1 (:func:`leverage`: the Newton step of the removal is ill-posed there)."""
    _check_form(form)
    if form == "diag":
        return V.diagonal(dim1=1, dim2=2) * e
    if form == "full":
        return (V @ e.unsqueeze(2)).squeeze(2)
    if p is None:
        raise ValueError("form='newton' needs the probabilities p")
    eye = torch.eye(V.shape[1], dtype=V.dtype, device=V.device)
    shift = (V @ torch.linalg.solve(eye - softmax_hessian(p) @ V, e.unsqueeze(2))).squeeze(2)
    # (I - Λ_i V_i)^{-1} exists as the removal's Newton step only while the leverage h_i < 1; beyond, the
    # "estimate" flips sign or explodes: ill-posed, so NaN
    return shift.masked_fill((leverage(p, V) >= 1)[:, None], float("nan"))


def deviation(p: torch.Tensor, V: torch.Tensor, e: torch.Tensor, form: str = "diag") -> torch.Tensor:
    """Estimated change of the softmax output Δp_i (N, K) when example i is removed (Eq. 13)."""
    _check_form(form)
    if form == "diag":
        lam = (p * (1 - p)).clamp(_EPS, 1 - _EPS)
        return lam * logit_shift(V, e, form="diag")
    return (softmax_hessian(p) @ logit_shift(V, e, p, form).unsqueeze(2)).squeeze(2)


def sensitivity(p: torch.Tensor, V: torch.Tensor, e: torch.Tensor, form: str = "diag") -> torch.Tensor:
    """Scalar sensitivity s_i = Σ_k |Δp_ik| (N,): the paper's "sum over absolute per-class values"."""
    return deviation(p, V, e, form).abs().sum(1)


def loo_nll(logits: torch.Tensor, y: torch.Tensor, V: torch.Tensor, form: str = "diag", reduce: bool = True):
    """Leave-one-out NLL estimate (Eqs. 15/16): mean_i −log softmax(f_i + Δf_i)[y_i], Δf_i from :func:`logit_shift`.

    The mean (not the sum) is reported so that it is on the scale of the mean test NLL, as the official code does.
    """
    e = residuals(logits, y)
    shifted = logits + logit_shift(V, e, torch.softmax(logits, 1), form)
    nll = F.cross_entropy(shifted, y, reduction="none")
    return nll.mean() if reduce else nll


def removal_truth(model, x: torch.Tensor, y: torch.Tensor, removed, *, delta: float, retrain_iters: int = 50,
                  retrain: dict | None = None, cache=None) -> torch.Tensor:
    r"""The true deviation of the softmax output of each removed example i (R,): Σ_k |σ(f_i(θ^{\i}))_k −
    σ(f_i(θ_ref))_k|, where θ^{\i} is a warm-started retrain from ``model``'s parameters without i and θ_ref the same
    protocol on all the data (so any drift of an imperfectly converged θ_* cancels): ``retrain_iters`` iterations of
    full-batch L-BFGS (converged) by default, or the keyword arguments ``retrain`` of :func:`mpe.train.train` (e.g.
    the paper's warm-started SGD). Retrains are cached jobs (:func:`mpe.retrain.retrained_outputs`)."""
    idx = [int(i) for i in removed]
    kw = dict(optimizer="lbfgs", lr=1.0, epochs=retrain_iters, delta=delta) if retrain is None else dict(retrain, delta=delta)
    unit = "iterations" if kw["optimizer"] == "lbfgs" else "epochs"
    ref, outs = retrained_outputs(model, x, y, [[i] for i in idx], x[idx], kw, cache,
                                  desc=f"retrain ({kw['optimizer']}, {kw['epochs']} {unit})")
    return torch.stack([(out[j] - ref[j]).abs().sum() for j, out in enumerate(outs)])


def removal_study(model, x: torch.Tensor, y: torch.Tensor, *, delta: float, removed, retrain_iters: int = 50,
                  posterior: str = "kfac", cache=None, check_iters: int | None = None,
                  n_check: int = 0, retrain: dict | None = None) -> dict:
    r"""Estimated vs true deviation of the softmax output when single examples are removed (MPE Fig. 2).

    The model must sit at θ_* = argmin L (sum scale, prior precision ``delta``). Estimates use the GLM predictive
    covariance of ``posterior`` ("kfac", "diag" or "full" GGN + δI) for all N examples and every form of
    :data:`FORMS`; the truth is :func:`removal_truth` with ``retrain_iters`` or ``retrain`` (a second truth with
    another recipe needs only another :func:`removal_truth`, not another study). With ``n_check > 0`` the first
    ``n_check`` L-BFGS truths are recomputed with ``check_iters`` iterations to measure how converged the truth is.

    Returns a dict: ``removed`` (R,), ``truth`` (R,), ``estimate`` {form: (N,)}, ``p`` (N, K), ``V`` (N, K, K),
    ``truth_check`` (max relative change of the checked truths, or None).
    """

    removed = [int(i) for i in removed]
    V = C.predictive_covariance(model, x, C.laplace_posterior(posterior, model, x, delta))
    logits = predict(model, x)
    p = torch.softmax(logits, 1)
    e = residuals(logits, y.to(logits.device))
    estimate = {form: sensitivity(p, V, e, form).cpu() for form in FORMS}
    kw = dict(delta=delta, cache=cache)
    truth = removal_truth(model, x, y, removed, retrain_iters=retrain_iters, retrain=retrain, **kw)
    check = None
    if n_check and retrain is None:
        better = removal_truth(model, x, y, removed[:n_check], retrain_iters=check_iters, **kw)
        check = float(((better - truth[:n_check]).abs() / better.abs().clamp_min(1e-12)).max())
    return dict(removed=torch.tensor(removed), truth=truth, estimate=estimate, p=p.cpu(), V=V.cpu(),
                truth_check=check)


def leverage(p: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """h_i = largest eigenvalue of Λ_i V_i (N,): how much example i pulls on its own prediction.

    The first-order estimate misses the factor (I − Λ_i V_i)⁻¹, so it is accurate where h_i ≪ 1 and under-estimates by
    up to 1/(1 − h_i) otherwise (for ridge regression h_i is the classical leverage).
    """
    return torch.linalg.eigvals(softmax_hessian(p) @ V).real.max(1).values


def loo_sweep(make_model, x, y, x_test, y_test, deltas, *, fit_iters: int = 500, posterior: str = "kfac",
              cache=None, executor=None) -> list[dict]:
    """Fig. 4/7: for each prior precision δ, fit θ_*(δ) from the same initialisation, then the LOO-CV estimate.

    ``make_model()`` returns the initialisation. Each δ is a job described by data (:func:`loo_job`; the network and
    the data go to the store once, :func:`mpe.retrain.stash`), cached, here or on a Dask ``executor``. Returns one
    dict per δ: ``delta``, ``loo`` {form: mean LOO NLL}, ``test_nll``, ``test_err``, ``train_nll``, ``train_err``, the
    per-example values behind the means (for intervals): ``loo_per_example`` {form: (N,)}, ``test_per_example`` (M,),
    and the leverage of every training example (:func:`leverage`, (N,)): where it nears 1 the first-order forms miss
    most of an example's pull on its own prediction.
    """

    if posterior not in C.LAPLACE:  # fail before any training
        raise ValueError(f"unknown posterior {posterior!r}; valid choices: {', '.join(C.LAPLACE)}")

    start = make_model()
    names = dict(start=stash(start), x=stash(x), y=stash(y), x_test=stash(x_test), y_test=stash(y_test))
    device = next(start.parameters()).device.type  # part of the key: results round differently per device
    specs = [dict(names, delta=float(d), fit_iters=fit_iters, posterior=posterior, device=device) for d in deltas]
    return run_specs(loo_job, specs, cache, executor=executor, desc="δ sweep")


def loo_job(spec: dict) -> dict:
    """One δ of :func:`loo_sweep`, rebuilt from its description: ``{"start": the initial network, "x", "y", "x_test",
    "y_test": its data (names in the store, mpe.retrain.stash), "delta": δ, "fit_iters": L-BFGS iterations,
    "posterior": a Laplace posterior of mpe.curvature.LAPLACE, "device": "cpu" | "cuda" | ...}``."""
    from . import get_device

    check_spec(spec, ("start", "x", "y", "x_test", "y_test", "delta", "fit_iters", "posterior", "device"), "loo_job")
    model = unstash(spec["start"]).to(get_device(spec["device"]))
    x, y, x_test, y_test = (unstash(spec[k]) for k in ("x", "y", "x_test", "y_test"))
    delta, posterior = spec["delta"], spec["posterior"]
    train(model, x, y, optimizer="lbfgs", lr=1.0, epochs=spec["fit_iters"], delta=delta)
    V = C.predictive_covariance(model, x, C.laplace_posterior(posterior, model, x, delta))
    logits = predict(model, x)
    yy = y.to(logits.device)
    test_nll, test_err = nll_and_error(model, x_test, y_test)
    train_nll, train_err = nll_and_error(model, x, y)
    per_example = {f: loo_nll(logits, yy, V, f, reduce=False).detach().cpu() for f in FORMS}
    test_logits = predict(model, x_test)
    test_per_example = F.cross_entropy(test_logits, y_test.to(test_logits.device), reduction="none").cpu()
    return dict(delta=float(delta), loo={f: float(v.mean()) for f, v in per_example.items()},
                test_nll=test_nll, test_err=test_err, train_nll=train_nll, train_err=train_err,
                loo_per_example=per_example, test_per_example=test_per_example,
                leverage=leverage(torch.softmax(logits, 1), V).detach().cpu())


def training_posterior(source: str, state, x, delta: float):
    """The Gaussian posterior at a training state: the optimiser's own (``"ivon"``: IVON's Hessian; ``"adam"``:
    Adam's preconditioner) or a Laplace GGN (``"diag"``, ``"kfac"``) fitted on x at the current parameters."""
    if source == "ivon":
        return C.ivon_posterior(state.optimizer)
    if source == "adam":
        return C.adam_posterior(state.optimizer, len(x), delta)
    return C.laplace_posterior(source, state.model, x, delta)


class LOOTracker:
    r"""Training callback for MPE Figs. 1(b), 5, 8–10: test NLL every epoch, LOO estimate at chosen epochs.

    At each epoch in ``at_epochs`` the LOO-CV estimate of Eqs. 15/16 is computed at the current parameters (the
    mean m_t for IVON) with the variance ``source``:

    - ``"ivon"``: the optimiser's own posterior σ² = 1/(N(h + δ/N)) (iBLR, Eq. 16, no extra data pass);
    - ``"adam"``: Adam's preconditioner, S = diag(N √v + δ) (Fig. 10);
    - ``"diag"`` / ``"kfac"``: a Laplace GGN (diagonal / K-FAC) + δI fitted on the training data at that epoch.

    After training, ``self.test`` is a list of (epoch, test NLL, test error), ``self.loo`` a list of
    (epoch, {form: LOO}) and ``self.per_example`` maps each LOO epoch to the per-example values behind them:
    ``{form: (N,) LOO NLL}, (M,) test NLL`` (for intervals: :func:`loo_gaps`). ``self.fit`` maps each LOO epoch to
    the two factors of the first-order shift Δf_i = V_i e_i: the mean training residual ‖e_i‖ = ‖σ(f_i) − e_{y_i}‖
    and the mean predictive variance tr V_i (``rows(fit=True)`` adds them as columns).
    """

    SOURCES = ("ivon", "adam", "diag", "kfac")

    def __init__(self, x, y, x_test, y_test, at_epochs, source: str, delta: float, forms=("diag", "full")):
        if source not in self.SOURCES:
            raise ValueError(f"unknown variance source {source!r}; valid choices: {', '.join(self.SOURCES)}")
        self.x, self.y, self.x_test, self.y_test = x, y, x_test, y_test
        self.at_epochs, self.source, self.delta, self.forms = set(at_epochs), source, delta, tuple(forms)
        self.test, self.loo, self.per_example, self.h_moved, self.fit = [], [], {}, {}, {}

    def posterior(self, state):
        return training_posterior(self.source, state, self.x, self.delta)

    def on_epoch_end(self, state) -> None:

        self.test.append((state.epoch, *nll_and_error(state.model, self.x_test, self.y_test)))
        if state.epoch in self.at_epochs:
            V = C.predictive_covariance(state.model, self.x, self.posterior(state))
            logits = predict(state.model, self.x)
            y = self.y.to(logits.device)
            nll = {f: loo_nll(logits, y, V, f, reduce=False).detach().cpu() for f in self.forms}
            self.loo.append((state.epoch, {f: float(v.mean()) for f, v in nll.items()}))
            test_logits = predict(state.model, self.x_test)
            test_nll = F.cross_entropy(test_logits, self.y_test.to(test_logits.device), reduction="none").cpu()
            self.per_example[state.epoch] = (nll, test_nll)
            self.fit[state.epoch] = dict(train_residual=float(residuals(logits, y).norm(dim=1).mean()),
                                         trace_v=float(V.diagonal(dim1=-2, dim2=-1).sum(-1).mean()))
            if self.source == "ivon":
                self.h_moved[state.epoch] = hess_moved(state.optimizer)

    def rows(self, fit: bool = False, **extra) -> list[dict]:
        """One dict per LOO checkpoint: ``epoch``, ``loo_<form>``, ``test_nll``, ``test_err``, for IVON ``h_moved``
        (:func:`hess_moved`), with ``fit`` the ``train_residual`` and ``trace_v`` of ``self.fit``, and ``extra``."""
        test = {e: (nll, err) for e, nll, err in self.test}
        return [dict(extra, epoch=e, **{f"loo_{f}": v for f, v in loo.items()}, test_nll=test[e][0], test_err=test[e][1],
                     **({"h_moved": self.h_moved[e]} if e in self.h_moved else {}), **(self.fit[e] if fit else {}))
                for e, loo in self.loo]


def matched_beta2(paper_steps: int, steps: int, paper_beta2: float = 0.99999) -> float:
    r"""IVON's β2 for a run of ``steps`` steps that puts its Hessian in the paper's regime.

    IVON updates h ← β2 h + (1 − β2) ĥ (+ a small correction), so after T steps h has moved a share 1 − β2^T of the
    way from its initial value h0 towards the data's ĥ. With the paper's β2 = 0.99999 a short run never leaves h0:
    600 steps move h by 0.6 %, where the paper's 200,000 steps move it by 86 %. ``paper_beta2 ** (paper_steps /
    steps)`` moves h by the same share in ``steps`` steps as ``paper_beta2`` does in ``paper_steps``, so that the
    variance σ² = 1/(N(h + δ/N)) is the optimiser's estimate to the same degree as in the paper (MPE notes §1.11).
    """
    if paper_steps < 1 or steps < 1 or not 0 < paper_beta2 < 1:
        raise ValueError(f"need positive step counts and 0 < beta2 < 1, got {paper_steps}, {steps}, {paper_beta2}")
    return float(paper_beta2 ** (paper_steps / steps))


IBLR_EPOCHS = 15  # iblr_posterior's IVON run: 5 averaging windows of 3 epochs


def iblr_posterior(model, x: torch.Tensor, y: torch.Tensor, delta: float, *, epochs: int = IBLR_EPOCHS, window: float = 3.0,
                   batch_size: int = 64, seed: int = 0, loss: str = "cross_entropy") -> C.Posterior:
    r"""iBLR's own variance at a trained model: S = diag(N h + δ), h the Hessian that IVON estimates when it runs at
    the model's parameters with learning rate 0 (the mean stays where training put it; ``model`` is not changed).

    Each step draws θ ~ N(m, σ²), σ² = 1/(N(h + δ/N)), and updates h ← β2 h + (1 − β2) ĥ (+ IVON's correction that
    keeps h + δ/N positive) with Price's estimator ĥ = ĝ (θ − m)/σ², a one-sample estimate of the diagonal of
    E_q[∇²ℓ̄] (Stein's lemma). β2 = 1 − B/(N·``window``) averages ĥ over about ``window`` epochs of minibatches, and
    ``epochs`` = 5 windows leave a share e^(−5) of the initial h0 = δ/N: the variance is the optimiser's estimate,
    not a hand-set h0 (issue #14 item 1). Being an expectation under q, h exceeds the Hessian at the mean where q
    is wide. ``x`` (N, ...), ``y`` (N,) (or targets (N, K) for ``loss="squared"``: :func:`mpe.train.train`).
    """

    if not 0 < window <= epochs or batch_size < 1 or delta <= 0:
        raise ValueError(f"need 0 < window <= epochs, batch_size >= 1 and delta > 0; got window={window}, "
                         f"epochs={epochs}, batch_size={batch_size}, delta={delta}")
    batch_size = min(batch_size, len(x))
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # IVON draws from the global generator: seeded here, restored after
        torch.manual_seed(seed)
        state = train(copy.deepcopy(model), x, y, epochs=epochs, lr=0.0, optimizer="ivon", batch_size=batch_size,
                      delta=delta, seed=seed, schedule="constant", hess_init=delta / len(x),
                      beta2=1 - batch_size / (len(x) * window), loss=loss)
    return C.ivon_posterior(state.optimizer)


def hess_moved(optimizer) -> float:
    """How far IVON's Hessian h has moved from its initial value h0: ‖h − h0‖ / ‖h0‖ over all parameters (0 at the
    start; the share 1 − β2^T of the distance to the data's Hessian after T steps)."""
    g = optimizer.param_groups[0]
    h, h0 = g["hess"], g["hess_init"]
    return float((h - h0).norm() / (h0 * h.numel() ** 0.5))


def loo_gaps(trackers: dict, epoch: int | None = None, form: str = "diag", n_boot: int = 1000, seed: int = 0) -> dict:
    r"""Relative gap |LOO − test NLL| / test NLL at ``epoch`` (default: each tracker's last LOO epoch) with bootstrap
    draws, for trackers that share their training and test examples (Figs. 1(b), 5, 8–10).

    One bootstrap resamples the N training examples (behind the LOO mean) and the M test examples (behind the test
    NLL) independently, with the same indices for every tracker, so that differences and ratios of gaps are paired.
    Returns ``{name: (gap, (n_boot,) draws)}``; :func:`mpe.stats.from_draws` turns one into an estimate.
    """
    rng = np.random.default_rng(seed)
    out = {}
    first = next(iter(trackers.values()))
    n, m = len(first.x), len(first.x_test)
    idx_train, idx_test = rng.integers(0, n, (n_boot, n)), rng.integers(0, m, (n_boot, m))
    for name, tr in trackers.items():
        loo, test = tr.per_example[epoch if epoch is not None else max(tr.per_example)]
        loo = loo[form].double().numpy()
        test = test.double().numpy()
        value = abs(loo.mean() - test.mean()) / test.mean()
        a, b = loo[idx_train].mean(1), test[idx_test].mean(1)
        out[name] = (float(value), np.abs(a - b) / b)
    return out


def loo_during_training(make_model, data, methods: dict, *, at_epochs, epochs: int, batch_size: int, delta: float,
                        hess_init: float = 0.1, beta2: float = 0.99999, seed: int = 0, progress: bool = True) -> dict:
    """Figs. 1(b), 5, 8–10: train from the same initialisation with a :class:`LOOTracker` per method.

    ``methods`` maps a name to ``dict(source=..., optimizer=..., lr=..., lr_min=...)``; ``make_model()`` returns the
    initial model, ``data`` a :class:`mpe.data.Data`; ``hess_init`` and ``beta2`` are IVON's (see
    :func:`matched_beta2`). Methods that differ only in their variance source (SGD + diag-GGN and SGD + K-FAC) share
    one training run, with one tracker each (the trackers draw no random numbers, so the run is the same as alone).
    Returns {name: tracker}, in the order of ``methods``.
    """
    runs = {}  # (optimizer, lr, lr_min) -> names
    for name, m in methods.items():
        runs.setdefault((m["optimizer"], m["lr"], m.get("lr_min", 0.0)), []).append(name)
    trackers = {}
    for (optimizer, lr, lr_min), names in runs.items():
        for name in names:
            trackers[name] = LOOTracker(data.x_train, data.y_train, data.x_test, data.y_test, at_epochs,
                                        methods[name]["source"], delta)
        train(make_model(), data.x_train, data.y_train, optimizer=optimizer, lr=lr, lr_min=lr_min, epochs=epochs,
              batch_size=batch_size, delta=delta, hess_init=hess_init, beta2=beta2, seed=seed,
              callbacks=[trackers[n] for n in names], progress=progress)
    return {name: trackers[name] for name in methods}


def loco_study(model, x, y, x_test, y_test, *, delta: float, posterior: str = "kfac", retrain_iters: int = 100,
               retrain: dict | None = None, cache=None) -> list[dict]:
    r"""Fig. 3(a)/11(d): leave-one-class-out estimate vs the test NLL after retraining without that class.

    The model must sit at θ_*. For each class c, the estimate is LOCO_c = mean over training examples i of class c of
    −log softmax(f_i + [V_i]_kk e_ik)[y_i] (the official code's per-example shift; no retraining), and the truth is the
    mean NLL and accuracy on the *whole* test set after a warm-started retrain on the data without class c: by default
    ``retrain_iters`` iterations of full-batch L-BFGS (converged), or the keyword arguments ``retrain`` of
    :func:`mpe.train.train` (e.g. the paper's low-learning-rate SGD). The two are on different scales, so a monotone
    trend is expected, not y = x. Returns one dict per class: ``loco``, ``test_nll``, ``test_acc``, ``acc_drop``, the
    reference run's ``base_nll`` and ``base_acc``, ``removed_acc``, the accuracy on the removed class's test examples
    after the retrain (how far the class was forgotten; ``base_removed_acc`` before), and the two parts of the test
    NLL: ``removed_nll`` on the removed class's test examples and ``rest_nll`` on the others (``base_rest_nll``
    before), so that test_nll = (n_c·removed_nll + (n − n_c)·rest_nll) / n.
    """

    V = C.predictive_covariance(model, x, C.laplace_posterior(posterior, model, x, delta))
    logits = predict(model, x)
    yy = y.to(logits.device)
    per_example = loo_nll(logits, yy, V, "diag", reduce=False).cpu()
    classes = sorted(int(c) for c in torch.unique(y))
    groups = [torch.nonzero(y == c).flatten().tolist() for c in classes]
    kw = dict(optimizer="lbfgs", lr=1.0, epochs=retrain_iters, delta=delta) if retrain is None else dict(retrain, delta=delta)
    ref, outs = retrained_outputs(model, x, y, groups, x_test, kw, cache, "class removal")
    yt = y_test.cpu()

    def scores(probs, rows=slice(None)):  # mean NLL and accuracy on the test rows ``rows``
        return (-probs[torch.arange(len(yt)), yt].clamp_min(1e-12).log()[rows].mean().item(),
                (probs.argmax(1) == yt)[rows].float().mean().item())

    base_nll, base_acc = scores(ref)
    out = []
    for c, group, probs in zip(classes, groups, outs):
        nll, acc = scores(probs)
        removed_nll, removed_acc = scores(probs, yt == c)
        out.append(dict(cls=c, loco=per_example[group].mean().item(), test_nll=nll, test_acc=acc,
                        acc_drop=base_acc - acc, base_nll=base_nll, base_acc=base_acc,
                        removed_acc=removed_acc, base_removed_acc=scores(ref, yt == c)[1], removed_nll=removed_nll,
                        rest_nll=scores(probs, yt != c)[0], base_rest_nll=scores(ref, yt != c)[0]))
    return out


def group_deviation(model, x: torch.Tensor, y: torch.Tensor, groups, posterior) -> dict:
    r"""Eq. 43: estimated change of the softmax outputs of a removed group M, two ways, as Σ_{i∈M} Σ_k |Δp_ik|.

    - ``joint``: Δf_M ≈ V_M e_M with the joint (MK × MK) covariance V_M = J_M S⁻¹ J_Mᵀ of the group's logits
      (Eq. 14/43, first approximation), then Δp_i = Λ_i Δf_i;
    - ``sum``: the off-diagonal blocks of V_M dropped, i.e. the sum of per-example estimates Λ_i V_i e_i
      (Eq. 43, second approximation).

    ``groups`` is a list of index lists; ``posterior`` a :class:`mpe.curvature.Posterior` (full, diag or K-FAC). Returns
    {"joint": (G,), "sum": (G,)}.
    """

    logits = predict(model, x)
    p = torch.softmax(logits, 1)
    e = residuals(logits, y.to(logits.device), clamp=False)
    lam = softmax_hessian(p)
    out = {"joint": [], "sum": []}
    for g in groups:
        g = torch.as_tensor(g)
        Z = C.whitened_jacobians(model, x[g], posterior)  # (M, K, Q)
        M, K, _ = Z.shape
        Zf = Z.reshape(M * K, -1)
        VM = Zf @ Zf.T
        df_joint = (VM @ e[g].reshape(-1)).reshape(M, K)
        blocks = VM.reshape(M, K, M, K)[torch.arange(M), :, torch.arange(M), :]  # (M, K, K) diagonal blocks
        df_sum = (blocks @ e[g].unsqueeze(2)).squeeze(2)
        for name, df in (("joint", df_joint), ("sum", df_sum)):
            out[name].append((lam[g] @ df.unsqueeze(2)).squeeze(2).abs().sum().item())
    return {k: torch.tensor(v) for k, v in out.items()}


def group_removal_truth(model, x, y, groups, *, delta: float, retrain_iters: int = 200,
                        cache=None) -> torch.Tensor:
    r"""The true Σ_{i∈M} Σ_k |Δp_ik| of removing each group M (G,): a warm-started L-BFGS retrain from ``model``'s
    parameters without M, compared with the same protocol on all the data (cached jobs)."""
    kw = dict(optimizer="lbfgs", lr=1.0, epochs=retrain_iters, delta=delta)
    ref, outs = retrained_outputs(model, x, y, groups, x, kw, cache, "group removal")
    return torch.tensor([(out[list(g)] - ref[list(g)]).abs().sum().item() for g, out in zip(groups, outs)])


def group_removal_study(model, x, y, groups, *, delta: float, posterior: str = "full", retrain_iters: int = 200,
                        cache=None) -> dict:
    r"""Fig. 6: estimated (:func:`group_deviation`) vs true (:func:`group_removal_truth`) Σ_{i∈M} Σ_k |Δp_ik| for
    removing each group M. Returns {"truth": (G,), "joint": (G,), "sum": (G,)}."""
    est = group_deviation(model, x, y, groups, C.laplace_posterior(posterior, model, x, delta))
    truth = group_removal_truth(model, x, y, groups, delta=delta, retrain_iters=retrain_iters, cache=cache)
    return dict(truth=truth, **est)


def sampled_residuals(logits: torch.Tensor, y: torch.Tensor, V: torch.Tensor, n_samples: int = 150,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    r"""Monte-Carlo residuals (N, K): e_i = mean_s softmax(f̃_s) − y_i with f̃_s ~ N(f_i, diag([V_i]_kk)).

    The official code's estimate of E_q[p] − y for Figs. 3(b) and 11 (``get_sampled_residuals``): the logits are
    sampled with the per-class (diagonal) predictive variance. ``V`` is (N, K, K) or already the diagonal (N, K).
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    var = V.diagonal(dim1=1, dim2=2) if V.dim() == 3 else V
    std = var.clamp_min(0).sqrt()
    p = torch.zeros_like(logits)
    for _ in range(n_samples):
        eps = torch.randn(logits.shape, generator=generator, dtype=logits.dtype).to(logits.device)
        p += torch.softmax(logits + std * eps, 1)
    return p / n_samples - F.one_hot(y.to(logits.device), logits.shape[1]).to(logits.dtype)


class SensitivityTracker:
    r"""Training callback for MPE Figs. 3(b) and 11: the sensitivity of every training example at chosen iterations.

    At each optimiser step in ``at_steps`` (``state.step`` after the update; the paper's checkpoints are iterations)
    it computes, at the current parameters (the mean m_t for IVON), s_i = Σ_k |p_ik(1 − p_ik) v_ik e_ik| with v_ik
    from the optimiser's own posterior (``source="ivon"``: S_t = diag(N(h_t + δ/N))) or a Laplace GGN (``"diag"``,
    ``"kfac"``), and e_i from ``n_samples`` Monte-Carlo logit samples (:func:`sampled_residuals`) or the mean
    (``n_samples=0``). After training, ``self.steps`` lists the checkpoints and ``self.values`` (C, N) the
    sensitivities.
    """

    def __init__(self, x, y, at_steps, source: str = "ivon", delta: float = 0.0, n_samples: int = 150, seed: int = 0):
        if source not in LOOTracker.SOURCES or source == "adam":
            raise ValueError(f"unknown variance source {source!r}; valid choices: ivon, diag, kfac")
        self.x, self.y, self.at_steps, self.source, self.delta = x, y, set(at_steps), source, delta
        self.n_samples, self.gen = n_samples, torch.Generator().manual_seed(seed)
        self.steps, self.values = [], []

    def on_batch_end(self, state, *_) -> None:
        if state.step not in self.at_steps:
            return
        V = C.predictive_covariance(state.model, self.x, training_posterior(self.source, state, self.x, self.delta))
        logits = predict(state.model, self.x)
        y = self.y.to(logits.device)
        e = sampled_residuals(logits, y, V, self.n_samples, self.gen) if self.n_samples else residuals(logits, y)
        self.steps.append(state.step)
        self.values.append(sensitivity(torch.softmax(logits, 1), V, e, "diag").cpu())

    def result(self) -> tuple[list[int], torch.Tensor]:
        return list(self.steps), torch.stack(self.values) if self.values else torch.empty(0)


def sorted_bins(values: torch.Tensor, n_bins: int = 100, order: torch.Tensor | None = None) -> torch.Tensor:
    """Sort examples by ``order`` (default: the last row of ``values``), split into ``n_bins`` equal bins, average.

    ``values`` (C, N) -> (C, n_bins). When N is not divisible by ``n_bins`` the first N mod n_bins bins get one
    extra example (numpy's array_split), so no example is dropped.
    """
    values = torch.as_tensor(values)
    if values.dim() == 1:
        values = values[None]
    if not 1 <= n_bins <= values.shape[1]:
        raise ValueError(f"need 1 <= n_bins <= N = {values.shape[1]}, got {n_bins}")
    idx = torch.argsort(values[-1] if order is None else torch.as_tensor(order), stable=True)
    return torch.stack([values[:, chunk].mean(1) for chunk in torch.tensor_split(idx, n_bins)], 1)


def top_share(values: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Share of the total sensitivity held by the top ``fraction`` of examples, per row of ``values`` (C, N) -> (C,).

    A value equal to ``fraction`` means no concentration (all equal); 1 means all of it sits in the top.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    values = torch.as_tensor(values)
    values = values[None] if values.dim() == 1 else values
    k = max(1, round(fraction * values.shape[1]))
    return values.topk(k, dim=1).values.sum(1) / values.sum(1)
