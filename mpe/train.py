r"""One training loop for every experiment, with callbacks for per-example statistics.

Conventions (MPE notes §1.11): the objective is on the *sum* scale

    L(θ) = Σ_i ℓ_i(θ) + δ/2 ‖θ‖²,

with δ the prior precision. Minibatch optimisers minimise L/N per step, i.e. mean cross-entropy over the batch plus
(δ/N)/2 ‖θ‖² (SGD, Adam, L-BFGS: an explicit L2 term; AdamW: decoupled weight decay δ/N and no explicit term; IVON:
``weight_decay = δ/N``, ``ess = N`` and no explicit term). The learning rate follows a cosine schedule from ``lr`` to
``lr_min`` over the epochs, stepped once per epoch. ``optimizer="lbfgs"`` runs full-batch L-BFGS with a strong-Wolfe
line search for ``epochs`` iterations: a deterministic, converged minimiser for small problems.

A callback is any object with ``on_epoch_end(state)``, ``on_batch_start(state, idx)`` (before the update on the
minibatch ``idx``) and/or ``on_batch_end(state, idx, logits, y)`` methods;
``state`` carries ``model``, ``optimizer``, ``epoch``, ``step`` and ``n``. Every paper's statistics (correctness,
loss, forgetting events, ...) are callbacks, not new loops. :func:`train_many` is the same loop for M small models
at once (stacked parameters, one vmapped step), for retraining sweeps.
"""
from __future__ import annotations

import contextvars
import copy
import functools
import math
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .data import AUGMENTATIONS, augmented

__all__ = ["train", "train_many", "vectorisable", "stop_after", "predict", "nll_and_error", "OPTIMIZERS", "SCHEDULES",
           "PerExampleRecorder", "VisitRecorder", "LearningDifficulty", "el2n", "flat_params", "set_flat_params",
           "l2_objective", "WORK", "IN_JOB", "work"]

OPTIMIZERS = ("sgd", "adam", "adamw", "ivon", "lbfgs")
SCHEDULES = ("cosine", "step", "multistep", "constant")
LOSSES = {"cross_entropy": F.cross_entropy,
          "squared": lambda out, y: 0.5 * (out - y).pow(2).reshape(len(out), -1).sum(1).mean()}

WORK: list[dict] = []  # one row per training run in this process: what the run cost, for :func:`work`
# True while a job of a sweep of mpe.retrain (run_jobs, run_specs) runs in this process: its runs are logged as jobs,
# which a Dask executor would have spread over workers (mpe.workload's wall-clock estimate relies on which runs are)
IN_JOB: contextvars.ContextVar[bool] = contextvars.ContextVar("IN_JOB", default=False)


def _log_run(model: nn.Module, optimizer: str, n: int, batch_size: int | None, epochs: int, steps: int,
             vectorised: int = 1) -> None:
    WORK.append(dict(model=getattr(model, "model_name", type(model).__name__), optimizer=optimizer, n=n,
                     batch_size=n if batch_size is None else min(batch_size, n), epochs=epochs, steps=steps,
                     vectorised=vectorised, job=IN_JOB.get()))


def work(rows=None) -> dict:
    """The training done by :func:`train` and :func:`train_many` in this process (``rows``: default :data:`WORK`),
    per model and batch size: ``{"<model> @ <batch size or full>": {"runs", "steps", "examples", "jobs"}}``, with
    ``examples`` the examples visited (epochs × n summed over runs), ``steps`` the optimiser steps (an L-BFGS
    iteration counts as one full-batch step and one visit of every example) and ``jobs`` the runs trained as jobs of
    a sweep (:data:`IN_JOB`). Results loaded from a cache cost nothing and are not counted; nor is work outside the
    training loop (Jacobians, kernels, posteriors)."""
    out: dict = {}
    for r in WORK if rows is None else rows:
        batch = "full" if r["batch_size"] >= r["n"] else r["batch_size"]
        t = out.setdefault(f"{r['model']} @ {batch}", dict(runs=0, steps=0, examples=0, jobs=0))
        t["runs"] += 1
        t["jobs"] += bool(r.get("job"))
        t["steps"] += r["steps"]
        t["examples"] += r["epochs"] * r["n"]
    return dict(sorted(out.items()))


def flat_params(model: nn.Module) -> torch.Tensor:
    """All parameters as one detached vector (P,), in ``model.parameters()`` order."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@torch.no_grad()
def set_flat_params(model: nn.Module, theta: torch.Tensor) -> None:
    i = 0
    for p in model.parameters():
        p.copy_(theta[i:i + p.numel()].view_as(p))
        i += p.numel()


@torch.no_grad()
@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 2048) -> torch.Tensor:
    """Logits (N, K) in eval mode, batched, without an autograd graph (so memory stays that of one batch)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = torch.cat([model(x[i:i + batch_size].to(device)) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out


def nll_and_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Mean negative log-likelihood and error rate on (x, y)."""
    logits = predict(model, x)
    y = y.to(logits.device)
    return F.cross_entropy(logits, y).item(), (logits.argmax(1) != y).float().mean().item()


def l2_objective(model, x, y, delta: float, n: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """L(θ)/N = (1/N)[Σ_i w_i ℓ_i(θ) + δ/2 ‖θ‖²] over the given examples (w_i = 1 by default)."""
    losses = F.cross_entropy(model(x), y, reduction="none")
    data = losses.sum() if weights is None else (weights * losses).sum()
    reg = sum((p * p).sum() for p in model.parameters())
    return (data + 0.5 * delta * reg) / n


@dataclass
class PerExampleRecorder:
    """Callback recording per-example quantities of (x, y) at the end of every epoch.

    ``metrics`` maps a name to ``fn(logits, y) -> (N,)``; defaults: ``correct`` and ``loss``. After training,
    ``self.history[name]`` is a tensor (epochs, N).
    """

    x: torch.Tensor
    y: torch.Tensor
    metrics: dict = field(default_factory=lambda: {
        "correct": lambda logits, y: (logits.argmax(1) == y).float(),
        "loss": lambda logits, y: F.cross_entropy(logits, y, reduction="none"),
    })
    history: dict = field(default_factory=dict)

    def on_epoch_end(self, state) -> None:
        logits = predict(state.model, self.x)
        y = self.y.to(logits.device)
        for name, fn in self.metrics.items():
            self.history.setdefault(name, []).append(fn(logits, y).cpu())

    def result(self) -> dict[str, torch.Tensor]:
        return {k: torch.stack(v) for k, v in self.history.items()}


def el2n(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EL2N score ‖softmax(z) − e_y‖₂ per example (N,) (Paul et al. 2021)."""
    q = torch.softmax(logits, 1)
    return (q - torch.nn.functional.one_hot(y, q.shape[1]).to(q.dtype)).norm(dim=1)


class VisitRecorder:
    """Callback: ``metric(logits, y)`` of each example at every visit, from the training forward pass *before* the
    update on its minibatch. ``history`` (epochs, N) holds one value per epoch (NaN where an example was not visited)."""

    def __init__(self, n: int, metric=None):
        self.n, self.metric = n, metric or (lambda logits, y: (logits.argmax(1) == y).float())
        self.current, self.history = torch.full((n,), float("nan")), []

    def on_batch_end(self, state, idx, logits, y) -> None:
        self.current[idx.cpu()] = self.metric(logits.detach().float(), y).cpu()

    def on_epoch_end(self, state) -> None:
        self.history.append(self.current)
        self.current = torch.full((self.n,), float("nan"))


class LearningDifficulty(VisitRecorder):
    """Each example's EL2N at every visit, before the update on its minibatch (as the official lpNTK code does);
    ``total`` (N,) is the sum over training, the learning difficulty (the area under the example's learning curve)."""

    def __init__(self, n: int):
        super().__init__(n, el2n)

    @property
    def total(self) -> torch.Tensor:
        return torch.stack(self.history).nansum(0) if self.history else torch.zeros(self.n)


def _make_optimizer(name, params, *, lr, momentum, nesterov, delta, n, hess_init, beta2, mc_samples):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=delta / n)
    if name == "ivon":
        import ivon

        return ivon.IVON(params, lr=lr, ess=n, weight_decay=delta / n, hess_init=hess_init, beta2=beta2,
                         mc_samples=mc_samples)
    raise ValueError(f"unknown optimizer {name!r}; valid choices: {', '.join(OPTIMIZERS)}")


def _check_recipe(optimizer, schedule, loss, augment, nesterov, epochs, lr):
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; valid choices: {', '.join(OPTIMIZERS)}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; valid choices: {', '.join(SCHEDULES)}")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; valid choices: {', '.join(LOSSES)}")
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; valid choices: {', '.join(AUGMENTATIONS)}")
    if nesterov and optimizer != "sgd":
        raise ValueError("nesterov momentum is an SGD option")
    if epochs < 0 or lr < 0 or (lr == 0 and optimizer != "ivon"):
        raise ValueError(f"need epochs >= 0 and lr > 0 (lr = 0 for IVON only: its Hessian estimated at a fixed mean), "
                         f"got epochs={epochs}, lr={lr}")


def _make_schedule(name, opt, *, epochs, lr_min, step_size, gamma, milestones):
    return {"cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs, 1), eta_min=lr_min),
            "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma),
            "multistep": lambda: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=gamma),
            "constant": lambda: torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)}[name]()


def own_rng(fn):
    """Run ``fn(model, ..., seed=...)`` on torch's global generator seeded from ``seed``, restored afterwards.

    IVON's weight noise and dropout masks come from the global generator. Seeding it per run makes a run depend on its
    arguments alone, not on what ran before it in the process (a cached run that was skipped, say), and leaves the
    caller's random stream as it was.
    """

    @functools.wraps(fn)
    def run(model, *args, seed: int = 0, **kwargs):
        device = next(model.parameters()).device
        accelerator = device.type in ("cuda", "mps")
        with torch.random.fork_rng(devices=[device.index or 0] if accelerator else [],
                                   device_type=device.type if accelerator else "cuda"):
            torch.manual_seed(seed)
            return fn(model, *args, seed=seed, **kwargs)

    return run


@own_rng
def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, epochs: int, lr: float, optimizer: str = "sgd",
          batch_size: int | None = 256, lr_min: float = 0.0, momentum: float = 0.9, delta: float = 0.0,
          shuffle: bool = True, seed: int = 0, callbacks=(), hess_init: float = 0.1, beta2: float = 0.99999,
          mc_samples: int = 1, progress: bool = False, tol: float = 1e-9, schedule: str = "cosine",
          step_size: int = 2, gamma: float = 0.7, milestones=(60, 120, 160), penalty=None,
          loss: str = "cross_entropy", augment: str = "none", nesterov: bool = False) -> SimpleNamespace:
    """Train ``model`` in place on (x (N, ...), y (N,)) and return ``state`` (model, optimizer, losses per epoch).

    ``seed`` sets the minibatch order and augmentations, and seeds torch's global generator for the run (IVON's weight
    noise, dropout masks), which is restored afterwards (:func:`own_rng`). ``batch_size=None`` means full batch.
    ``schedule``: "cosine" (``lr`` to ``lr_min``), "step" (× ``gamma`` every ``step_size`` epochs, the lpNTK recipe),
    "multistep" (× ``gamma`` after each epoch in ``milestones``, Toneva's CIFAR recipe) or "constant"; stepped once per
    epoch. ``nesterov``: Nesterov momentum (SGD only). ``augment``: a name from :data:`mpe.data.AUGMENTATIONS` applied
    to every minibatch (drawn from the seeded generator; callbacks see the logits of the augmented batch, as Toneva's
    online statistics do). ``penalty(model) -> scalar`` is added to every minibatch loss (a continual-learning
    regulariser such as λ·FSD). ``loss``: "cross_entropy" (labels y (N,)) or "squared" (½‖f(x) − y‖² per example,
    targets y (N, K); regression). The optimiser object is returned in ``state.optimizer`` so that its preconditioner
    (IVON's Hessian, Adam's second moment) can be read as a variance. Callbacks get ``on_batch_start(state, idx)``,
    ``on_batch_end(state, idx, logits, yb)`` and ``on_epoch_end(state)``; during a step ``state.batch`` is the
    (augmented) minibatch (xb, yb) the step uses, and a callback that sets ``state.stop`` ends training after the
    current epoch (:func:`stop_after`).
    """
    _check_recipe(optimizer, schedule, loss, augment, nesterov, epochs, lr)
    loss_fn = LOSSES[loss]
    if optimizer == "lbfgs" and (penalty is not None or loss != "cross_entropy"):
        raise ValueError("penalty and the squared loss are supported by the minibatch optimisers, not by lbfgs")
    device = next(model.parameters()).device
    x, y = x.to(device), y.to(device)
    n = len(x)
    model.train()
    state = SimpleNamespace(model=model, optimizer=None, epoch=0, step=0, n=n, losses=[], stop=False)

    if optimizer == "lbfgs":
        opt = torch.optim.LBFGS(model.parameters(), lr=lr, max_iter=max(epochs, 1), history_size=50,
                                tolerance_grad=tol, tolerance_change=tol * 1e-3, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = l2_objective(model, x, y, delta, n)
            loss.backward()
            return loss

        if epochs:
            opt.step(closure)
        state.optimizer, state.epoch, state.step = opt, epochs, opt.state[opt._params[0]].get("n_iter", 0)
        _log_run(model, optimizer, n, None, state.step, state.step)  # each iteration visits all n examples
        state.losses.append(l2_objective(model, x, y, delta, n).item())
        for cb in callbacks:
            getattr(cb, "on_epoch_end", lambda s: None)(state)
        return state

    # Images in the channels-last layout (NHWC) on a CPU: oneDNN's convolutions and max-pooling run 15-45 % faster a
    # step on one thread (SmallCNN 57 -> 32 ms, measured); float32 only (oneDNN has no float64 kernels), not for IVON
    # (it flattens parameters with .view). The parameters go back to the default layout when training ends.
    nhwc = (x.dim() == 4 and x.dtype == torch.float32 and device.type == "cpu" and optimizer in VECTORISED_OPTIMIZERS
            and any(p.dim() == 4 for p in model.parameters()))
    if nhwc:
        model.to(memory_format=torch.channels_last)
    opt = _make_optimizer(optimizer, model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov, delta=delta, n=n,
                          hess_init=hess_init, beta2=beta2, mc_samples=mc_samples)
    sched = _make_schedule(schedule, opt, epochs=epochs, lr_min=lr_min, step_size=step_size, gamma=gamma,
                           milestones=milestones)
    state.optimizer = opt
    explicit_l2 = optimizer in ("sgd", "adam")
    bs = n if batch_size is None else batch_size
    g = torch.Generator().manual_seed(seed)
    epochs_iter = range(epochs)
    if progress:
        from tqdm.auto import tqdm

        epochs_iter = tqdm(epochs_iter, desc=f"train ({optimizer})", leave=False)
    for epoch in epochs_iter:
        order = torch.randperm(n, generator=g).to(device) if shuffle else torch.arange(n, device=device)
        total = 0.0
        for start in range(0, n, bs):
            idx = order[start:start + bs]
            xb, yb = augmented(x.index_select(0, idx), augment, g), y.index_select(0, idx)
            if nhwc:
                xb = xb.contiguous(memory_format=torch.channels_last)
            state.batch = (xb, yb)
            for cb in callbacks:
                if hasattr(cb, "on_batch_start"):
                    cb.on_batch_start(state, idx)

            def step_loss():
                logits = model(xb)
                value = loss_fn(logits, yb)
                if explicit_l2 and delta:
                    value = value + 0.5 * (delta / n) * sum((p * p).sum() for p in model.parameters())
                if penalty is not None:
                    value = value + penalty(model)
                return logits, value

            opt.zero_grad()
            if optimizer == "ivon":
                for _ in range(mc_samples):
                    with opt.sampled_params(train=True):
                        logits, batch_loss = step_loss()
                        batch_loss.backward()
            else:
                logits, batch_loss = step_loss()
                batch_loss.backward()
            opt.step()
            state.step += 1
            total += batch_loss.item() * len(idx)
            if not math.isfinite(batch_loss.item()):
                raise FloatingPointError(f"training diverged at epoch {epoch} (loss {batch_loss.item()}); lower lr")
            for cb in callbacks:
                if hasattr(cb, "on_batch_end"):
                    cb.on_batch_end(state, idx, logits.detach(), yb)
        sched.step()
        state.epoch = epoch + 1
        state.losses.append(total / n)
        for cb in callbacks:
            if hasattr(cb, "on_epoch_end"):
                cb.on_epoch_end(state)
        if state.stop:
            break
    if nhwc:
        model.to(memory_format=torch.contiguous_format)
    _log_run(model, optimizer, n, batch_size, state.epoch, state.step)
    return state


VECTORISED_OPTIMIZERS = ("sgd", "adam", "adamw")
_OTHER_OPTIMIZERS_KEYWORDS = {"hess_init", "beta2", "mc_samples", "tol", "progress", "penalty"}  # unused (penalty: None)


def vectorisable(model: nn.Module, optimizer: str = "sgd", penalty=None, **_) -> str | None:
    """Why :func:`train_many` cannot train ``model`` with this recipe, or None if it can. It needs an optimiser
    whose update is elementwise (SGD, Adam, AdamW), no penalty, no buffers (BatchNorm's running statistics) and no
    dropout (a vmapped program draws other masks than one model trained alone would)."""
    if optimizer not in VECTORISED_OPTIMIZERS:
        return f"optimizer {optimizer!r} (vectorised: {', '.join(VECTORISED_OPTIMIZERS)})"
    if penalty is not None:
        return "a penalty"
    if any(True for _ in model.buffers()):
        return "buffers (BatchNorm running statistics)"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return "dropout"
    return None


def train_many(models: list, x: torch.Tensor, y: torch.Tensor, subsets=None, seeds=None, *, epochs: int, lr: float,
               optimizer: str = "sgd", batch_size: int | None = 256, lr_min: float = 0.0, momentum: float = 0.9,
               delta: float = 0.0, shuffle: bool = True, schedule: str = "cosine", step_size: int = 2,
               gamma: float = 0.7, milestones=(60, 120, 160), loss: str = "cross_entropy", augment: str = "none",
               nesterov: bool = False, callbacks=None, chunk: int | None = None, **unused) -> torch.Tensor:
    r"""Train M models of one architecture at once: model m on (x[subsets[m]], y[subsets[m]]) with its minibatch
    order and augmentation drawn from ``seeds[m]``, in place. For every m the result equals

        train(models[m], x[subsets[m]], y[subsets[m]], seed=seeds[m], **recipe)

    to float rounding (tested), but the M models take each step together: their parameters are stacked (M, ...),
    one ``torch.func.vmap`` of the forward pass gives the logits (M, B, K), and one backward pass of Σ_m L_m gives
    every model its own gradient (the models share no parameters, so ∂(Σ_m L_m)/∂θ_m = ∂L_m/∂θ_m). The optimisers
    allowed (:data:`VECTORISED_OPTIMIZERS`) update elementwise, so one optimiser over the stacked tensors is M
    optimisers. Subsets of different sizes are trained in groups of one size (the step count per epoch and the prior
    term δ/n depend on n); ``chunk`` caps how many models share one program (memory). ``x`` (N, ...), ``y`` (N,) or
    (N, K); ``subsets`` M index tensors (default: all of x for every model); ``seeds`` M ints (default 0..M-1).
    ``callbacks``: None or M sequences, model m's callbacks, called as by ``train`` with model m's own ``state``
    (epoch, step, n, batch) and minibatch positions in its subset; ``state.model`` is None (the parameters are
    stacked), so callbacks that evaluate the model (e.g. :class:`PerExampleRecorder`) need ``train``.
    Returns the mean training loss per model and epoch (M, epochs), as ``train``'s ``state.losses``. Models that
    :func:`vectorisable` rejects raise ValueError: train them with :func:`train`.
    """
    from torch.func import functional_call, stack_module_state, vmap

    other = set(unused) - _OTHER_OPTIMIZERS_KEYWORDS
    if other:
        raise TypeError(f"train_many got unexpected keywords {sorted(other)}")
    m_all = len(models)
    subsets = [torch.arange(len(x))] * m_all if subsets is None else [torch.as_tensor(s).long().cpu() for s in subsets]
    seeds = list(range(m_all)) if seeds is None else [int(s) for s in seeds]
    callbacks = [()] * m_all if callbacks is None else [list(c) for c in callbacks]
    if len(subsets) != m_all or len(seeds) != m_all or len(callbacks) != m_all:
        raise ValueError(f"need one subset, seed and callback list per model: {m_all} models, {len(subsets)} subsets, "
                         f"{len(seeds)} seeds, {len(callbacks)} callback lists")
    _check_recipe(optimizer, schedule, loss, augment, nesterov, epochs, lr)
    if m_all == 0:
        return torch.zeros(0, epochs)
    why = vectorisable(models[0], optimizer, unused.get("penalty"))
    if why is not None:
        raise ValueError(f"train_many cannot vectorise this model and recipe: {why}; train it with train()")
    shapes = [p.shape for p in models[0].parameters()]
    if any([p.shape for p in m.parameters()] != shapes for m in models):
        raise ValueError("train_many needs models of one architecture (the same parameter shapes)")
    recipe = dict(epochs=epochs, lr=lr, optimizer=optimizer, batch_size=batch_size, lr_min=lr_min, momentum=momentum,
                  delta=delta, shuffle=shuffle, schedule=schedule, step_size=step_size, gamma=gamma,
                  milestones=milestones, loss=loss, augment=augment, nesterov=nesterov)
    sizes = [len(s) for s in subsets]
    groups = {}
    for m, size in enumerate(sizes):
        groups.setdefault(size, []).append(m)
    if len(groups) > 1 or (chunk is not None and m_all > chunk):
        losses = torch.zeros(m_all, epochs)
        step = chunk or m_all
        for members in groups.values():
            for i in range(0, len(members), step):
                part = members[i:i + step]
                part_losses = train_many([models[m] for m in part], x, y, [subsets[m] for m in part],
                                          [seeds[m] for m in part], callbacks=[callbacks[m] for m in part], **recipe)
                losses[part, :part_losses.shape[1]] = part_losses
        return losses

    device = next(models[0].parameters()).device
    x, y = x.to(device), y.to(device)
    n, m_all = sizes[0], len(models)
    base = copy.deepcopy(models[0]).to("meta")
    forward = vmap(lambda p, xb: functional_call(base, p, (xb,)))
    explicit_l2 = optimizer in ("sgd", "adam") and delta
    bs = n if batch_size is None else batch_size
    kept = torch.stack(subsets).to(device)  # (M, n) indices into x

    def batch(idx):  # idx (M, B) -> xb (M, B, ...), yb (M, B, ...); index_select gathers rows twice as fast as x[idx]
        flat = idx.reshape(-1)
        return (x.index_select(0, flat).view(*idx.shape, *x.shape[1:]),
                y.index_select(0, flat).view(*idx.shape, *y.shape[1:]))

    def model_losses(params, xb, yb):  # -> logits (M, B, K), each model's minibatch loss (M,)
        logits = forward(params, xb)
        if loss == "cross_entropy":
            per = F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(m_all, -1).mean(1)
        else:
            per = 0.5 * (logits - yb).pow(2).reshape(m_all, xb.shape[1], -1).sum(2).mean(1)
        if explicit_l2:
            per = per + 0.5 * (delta / n) * sum(p.pow(2).flatten(1).sum(1) for p in params.values())
        return logits, per

    params, _ = stack_module_state(models)  # {name: (M, ...)}, new leaf tensors
    params = _laid_out_as_gradients(params, lambda p: model_losses(p, *batch(kept[:, :bs]))[1].sum())
    opt = _make_optimizer(optimizer, list(params.values()), lr=lr, momentum=momentum, nesterov=nesterov, delta=delta,
                          n=n, hess_init=0.0, beta2=0.0, mc_samples=1)
    sched = _make_schedule(schedule, opt, epochs=epochs, lr_min=lr_min, step_size=step_size, gamma=gamma,
                           milestones=milestones)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    losses = torch.zeros(m_all, epochs)
    states = [SimpleNamespace(model=None, optimizer=None, epoch=0, step=0, n=n, stop=False) for _ in range(m_all)]
    watched = [m for m in range(m_all) if callbacks[m]]  # models with callbacks: the others need no bookkeeping

    def call(hook, m, *args):
        for cb in callbacks[m]:
            if hasattr(cb, hook):
                getattr(cb, hook)(states[m], *args)

    for epoch in range(epochs):
        order = (torch.stack([torch.randperm(n, generator=g) for g in gens]) if shuffle
                 else torch.arange(n).expand(m_all, n)).to(device)
        rows = kept.gather(1, order)  # (M, n): model m's examples in its own order
        total = torch.zeros(m_all, device=device)
        for start in range(0, n, bs):
            idx = rows[:, start:start + bs]
            xb, yb = batch(idx)
            if augment != "none":
                xb = torch.stack([augmented(xb[m], augment, gens[m]) for m in range(m_all)])
            local = order[:, start:start + bs]  # positions in each model's subset, as train's callbacks see them
            for m in watched:
                states[m].batch = (xb[m], yb[m])
                call("on_batch_start", m, local[m])
            logits, per = model_losses(params, xb, yb)
            opt.zero_grad()
            per.sum().backward()
            opt.step()
            if not torch.isfinite(per).all():
                bad = torch.nonzero(~torch.isfinite(per)).flatten().tolist()
                raise FloatingPointError(f"training diverged at epoch {epoch} for models {bad}; lower lr")
            total += per.detach() * idx.shape[1]
            for m in watched:
                states[m].step += 1
                call("on_batch_end", m, local[m], logits[m].detach(), yb[m])
        sched.step()
        losses[:, epoch] = total.cpu() / n
        for m in watched:
            states[m].epoch = epoch + 1
            call("on_epoch_end", m)
        stops = {states[m].stop for m in watched} | ({False} if len(watched) < m_all else set())
        if stops == {True}:
            losses = losses[:, :epoch + 1]
            break
        if len(stops) > 1:
            raise ValueError("callbacks stopped some models but not all; train them with train()")
    with torch.no_grad():
        for m, model in enumerate(models):
            for name, p in model.named_parameters():
                p.copy_(params[name][m])
    epochs_run = losses.shape[1]
    for model in models:
        _log_run(model, optimizer, n, batch_size, epochs_run, epochs_run * math.ceil(n / bs), vectorised=m_all)
    return losses


def _laid_out_as_gradients(params: dict, total) -> dict:
    """The stacked parameters {name: (M, ...)} as new leaves laid out in memory as the backward pass of ``total``
    (params -> scalar) produces their gradients. A vmapped Linear's weight gradient comes out as a transposed
    product, and a gradient whose strides differ from its parameter's is copied at every step (autograd's gradient
    layout contract: 15-20 % of a small MLP's step on a CPU); values are unchanged. Layouts that are not dense stay."""
    grads = torch.autograd.grad(total(params), list(params.values()))

    def dense(g):
        expected = 1
        for size, stride in sorted(zip(g.shape, g.stride()), key=lambda s: s[1]):
            if size > 1 and stride != expected:
                return False
            expected *= size
        return True

    return {k: (torch.empty_strided(p.shape, g.stride(), dtype=p.dtype, device=p.device).copy_(p.detach())
                .requires_grad_() if dense(g) and g.stride() != p.stride() else p)
            for (k, p), g in zip(params.items(), grads)}


def stop_after(epochs: int):
    """Callback that ends training after ``epochs`` epochs while the schedule keeps its full length: the first epochs
    of a longer run (EL2N "after 20 of 200 epochs"), not a short run with its own, faster-decaying schedule."""
    if epochs < 1:
        raise ValueError(f"need epochs >= 1, got {epochs}")

    def on_epoch_end(state):
        state.stop = state.stop or state.epoch >= epochs

    return SimpleNamespace(on_epoch_end=on_epoch_end)
