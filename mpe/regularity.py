r"""Per-example learning statistics as training callbacks: regularity measures, forgetting events and their
one-step prediction.

**Regularity paper** (Zhang et al., notes §1.2, reconstructed from the abstract): one training run — the "unified
computing procedure", :func:`unified_run` — records the correctness of every training example at each visit (before
the update on its minibatch, Toneva et al.'s Algorithm 1) and of every test example at each epoch end. From a
correctness history (T, N) :func:`regularity` gives CBTL / CBGL (cumulative correct classifications), forgetting /
mal-generalising events and the never-correct flags. Baselines: Toneva's unforgettable examples, first-learning
epoch and misclassification margin; Jiang et al.'s C-score by hold-out (:func:`cscore_holdout`).

A *forgetting event* of example i at step t: i was classified correctly before the update of step t and wrongly
after it. The lpNTK paper (Table 1, its official ``analysis/forget_el2n.py``) predicts these events for the examples
of the previous minibatch from Eq. 1, the first-order change of their predictions caused by the current minibatch
(:func:`mpe.kernels.delta_q`); :class:`ForgettingPredictor` does this inside the one training loop.
"""
from __future__ import annotations

import torch

from .kernels import delta_q
from .train import LearningDifficulty, VisitRecorder, el2n  # training callbacks, defined with the loop

__all__ = ["ForgettingPredictor", "VisitRecorder", "LearningDifficulty", "forgetting_counts", "regularity", "el2n",
           "precision_recall_f1", "margin", "true_class_prob", "sgd_recipe", "unified_run", "unified_runs",
           "combine_runs", "first_learned", "unforgettable", "misclassification_margin", "ranking", "windows",
           "cscore_holdout", "cscore_splits", "cscore_from_runs", "detection_curve", "binned_accuracy", "unified_job",
           "partition_job"]


def forgetting_counts(correct: torch.Tensor) -> torch.Tensor:
    """Toneva et al.'s forgetting score from per-visit correctness (epochs, N): the number of correct -> incorrect
    transitions between consecutive visits, with +inf for examples never classified correctly (so that they sort
    last, whatever the number of epochs). Returns (N,); see :func:`regularity` for the other measures."""
    r = regularity(correct)
    return torch.where(r["never"], torch.full_like(r["events"], float("inf")), r["events"])


def regularity(correct: torch.Tensor, burn_in: int = 0) -> dict:
    r"""Sample-regularity measures from a correctness history (T, N) (notes on the regularity paper, §1.2,
    reconstructed): for training examples the per-visit correctness (:class:`VisitRecorder`), for test examples the
    correctness at each evaluation (e.g. :class:`mpe.train.PerExampleRecorder` at every epoch end).

    ``burn_in`` leaves out the first evaluations (0: all, as the papers count). Online visits of the first epoch are
    recorded while the network learns within that epoch, so whether an example is right there depends mostly on when
    its minibatch came; one epoch of burn-in removes that position noise from CBTL and forgetting events.

    - ``cb``: the cumulative number of correct classifications, CBTL (train) or CBGL (test), (N,);
    - ``cb_norm``: the same divided by the number of evaluations T (Jiang et al.'s cumulative accuracy), in [0, 1];
    - ``events``: correct -> incorrect transitions, forgetting events (train) or mal-generalising events (test);
    - ``never``: examples never classified correctly (they have ``cb = 0`` and no events);
    - ``events_for_sorting``: ``events`` with the never-correct examples set to T, Toneva et al.'s rule for ranking.
    """
    c = torch.as_tensor(correct, dtype=torch.float)
    if c.dim() != 2 or not torch.all((c == 0) | (c == 1)):
        raise ValueError("correct must be a (T, N) tensor of 0/1 values (no missing visits)")
    if not 0 <= burn_in < c.shape[0]:
        raise ValueError(f"burn_in must lie in [0, T) = [0, {c.shape[0]}), got {burn_in}")
    c = c[burn_in:]
    t = c.shape[0]
    events = ((c[:-1] == 1) & (c[1:] == 0)).sum(0).float()
    never = ~(c == 1).any(0)
    return dict(cb=c.sum(0), cb_norm=c.mean(0), events=events, never=never,
                events_for_sorting=torch.where(never, torch.full_like(events, float(t)), events))


def precision_recall_f1(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1; an undefined precision or recall is 1.0 (as in the official code)."""
    p = tp / (tp + fp) if tp + fp else 1.0
    r = tp / (tp + fn) if tp + fn else 1.0
    return p, r, (2 * p * r / (p + r) if p + r else 0.0)


def _correct_and_probs(model, x, y):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            q = torch.softmax(model(x), 1)
    finally:
        model.train(was_training)
    return q.argmax(1) == y, q


class ForgettingPredictor:
    r"""Callback: at every step t, the examples of minibatch t−1 are checked before and after the update on
    minibatch t, and Eq. 1 predicts their new predictions q̂ = q_{t−1} + Δq with the step's learning rate.

    True event: correct at θ_{t−1} and wrong at θ_t. Predicted event: correct at θ_{t−1} and argmax q̂ ≠ y. Counts
    ``tp``, ``fp``, ``fn``, ``tn`` are summed over the first ``max_steps`` steps (all if None); ``checked`` counts the
    examples that were correct before the update (the ones that can be forgotten). ``el2n_error`` is the median over
    the checked examples of |EL2N(q̂) − EL2N(q_t)|, an absolute error on EL2N's scale [0, √2] (a ratio would explode
    for confidently correct examples, whose EL2N is near 0). Eq. 1 is exact to first order for plain SGD (no momentum,
    no weight decay).
    With augmentation, Δq is that of the augmented minibatch the step used (``state.batch``), and the checked
    examples are the clean ones: forgetting is a change of the training example's own prediction.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, max_steps: int | None = None):
        self.x, self.y, self.max_steps = x, y, max_steps
        self.prev, self.pending = None, None
        self.tp = self.fp = self.fn = self.tn = self.checked = 0
        self.el2n_errors = []

    def on_batch_start(self, state, idx) -> None:
        self.pending = None
        if self.prev is None or (self.max_steps is not None and state.step >= self.max_steps):
            return
        device = next(state.model.parameters()).device
        xp, yp = self.x[self.prev].to(device), self.y[self.prev].to(device)
        correct, q = _correct_and_probs(state.model, xp, yp)
        lr = state.optimizer.param_groups[0]["lr"]
        xb, yb = state.batch
        q_hat = q + delta_q(state.model, xp, xb, yb, lr)
        self.pending = (xp, yp, correct, q_hat)

    def on_batch_end(self, state, idx, *_) -> None:
        if self.pending is not None:
            xp, yp, correct, q_hat = self.pending
            after, q_t = _correct_and_probs(state.model, xp, yp)
            true = correct & ~after
            pred = correct & (q_hat.argmax(1) != yp)
            self.tp += int((true & pred).sum())
            self.fp += int((~true & pred).sum())
            self.fn += int((true & ~pred).sum())
            self.tn += int((~true & ~pred).sum())
            self.checked += int(correct.sum())
            onehot = torch.nn.functional.one_hot(yp, q_t.shape[1]).to(q_t.dtype)
            self.el2n_errors.append(((q_hat - onehot).norm(dim=1) - (q_t - onehot).norm(dim=1)).abs().cpu())
        self.prev = idx.cpu()

    def summary(self) -> dict:
        """Counts, precision, recall, F1, the number of events and their rate among the examples that were correct."""
        p, r, f1 = precision_recall_f1(self.tp, self.fp, self.fn)
        events = self.tp + self.fn
        return dict(tp=self.tp, fp=self.fp, fn=self.fn, tn=self.tn, precision=p, recall=r, f1=f1, events=events,
                    event_rate=events / max(self.checked, 1),
                    el2n_error=float(torch.cat(self.el2n_errors).median()) if self.el2n_errors else float("nan"))


# ----------------------------------------------------------------------------------------------------------
# The regularity paper: one run, four measures (notes §1.2-§1.5), and the Toneva / Jiang baselines
# ----------------------------------------------------------------------------------------------------------
def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Toneva et al.'s classification margin (N,): the true class's logit minus the largest other logit."""
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.scatter(1, y[:, None], float("-inf")).max(1).values
    return true - other


def true_class_prob(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """p(y | x) (N,), the learning-speed proxy of Jiang et al. when accumulated over epochs."""
    return torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)


def unified_run(model, data, *, offline: bool = True, **train_kw) -> dict:
    r"""One training run that yields every regularity measure (notes §1.5), on ``data`` (:class:`mpe.data.Data`).

    Returns CPU tensors, one row per epoch:

    - ``train_visit`` (E, N): correctness of each training example at its visit, in train mode and before the update
      on its minibatch (online; CBTL and forgetting events); ``train_margin`` (E, N) its margin there;
    - ``train_epoch``, ``train_py`` (E, N): correctness and p(y|x) of every training example at each epoch end, in
      eval mode (offline; only with ``offline=True``);
    - ``test_epoch``, ``test_py`` (E, M): the same for the test examples (CBGL and mal-generalising events);
    - ``test_acc`` (E,), ``train_loss`` (E,).

    ``train_kw`` goes to :func:`mpe.train.train` (``epochs``, ``lr``, ...).
    """
    from .train import PerExampleRecorder, train

    metrics = {"correct": lambda z, y: (z.argmax(1) == y).float(), "py": true_class_prob}
    visit, visit_margin = VisitRecorder(len(data.y_train)), VisitRecorder(len(data.y_train), margin)
    test = PerExampleRecorder(data.x_test, data.y_test, dict(metrics))
    callbacks = [visit, visit_margin, test]
    if offline:
        callbacks.append(PerExampleRecorder(data.x_train, data.y_train, dict(metrics)))
    state = train(model, data.x_train, data.y_train, callbacks=callbacks, **train_kw)
    te = test.result()
    out = dict(train_visit=torch.stack(visit.history), train_margin=torch.stack(visit_margin.history),
               test_epoch=te["correct"], test_py=te["py"], test_acc=te["correct"].mean(1),
               train_loss=torch.tensor(state.losses))
    if offline:
        tr = callbacks[-1].result()
        out.update(train_epoch=tr["correct"], train_py=tr["py"])
    return out


def sgd_recipe(n_train: int, *, epochs: int, lr: float, momentum: float, batch_size: int, weight_decay: float = 0.0,
               nesterov: bool = False, augment: str = "none", schedule: str = "constant", milestones=(60, 120, 160),
               gamma: float = 0.2) -> dict:
    """Keywords of :func:`mpe.train.train` for Toneva's SGD recipes, always in this one form, so that notebooks with
    the same setting share their cached :func:`unified_runs`. MNIST: constant lr, momentum 0.5; CIFAR-10: Nesterov
    momentum 0.9, lr × ``gamma`` after each epoch in ``milestones`` (schedule "multistep"), crop+flip, weight decay.
    ``weight_decay`` is per example: SGD gets δ = weight_decay · n_train (retrain a subset with its own size)."""
    return dict(epochs=epochs, lr=lr, momentum=momentum, batch_size=batch_size, schedule=schedule,
                milestones=list(milestones), gamma=gamma, nesterov=nesterov, augment=augment,
                delta=weight_decay * n_train)


def unified_runs(data, model: str, seeds, *, device=None, offline: bool = True, cache=None, progress: bool = True,
                 **train_kw) -> list[dict]:
    """:func:`unified_run` of the named model (initialised with each seed, minibatch order from the same seed) for
    every seed, as cached jobs keyed by the data, the model, the seed and every training setting, so notebooks that
    share a setting share the runs and an interrupted sweep resumes. Data that carries its description
    (``data.spec``: made by :func:`mpe.data.load`, ``subset``, ``permute_pixels``) runs as jobs described by data
    (:func:`unified_job`, here or on a Dask worker); other data (a user's own tensors) as closures over them."""
    from .models import get_model
    from .retrain import job_key, run_jobs, run_specs, tensor_digest

    dev = torch.device(device).type if device is not None else "cpu"
    if data.spec is not None:
        specs = [dict(data=data.spec, model=model, seed=int(s), offline=offline, train=train_kw, device=dev)
                 for s in seeds]
        return run_specs(unified_job, specs, cache, progress=progress, desc=f"{model} runs")
    digest = tensor_digest(data.x_train) + tensor_digest(data.y_train) + tensor_digest(data.x_test)

    def job(seed):
        def run():
            net = get_model(model, data.shape, data.n_classes, seed=seed)
            net = net.to(device) if device is not None else net
            return unified_run(net, data, offline=offline, seed=seed, **train_kw)
        return run

    keys = {seed: job_key(study="unified_run", data=digest, model=model, seed=seed, offline=offline, device=dev,
                          **train_kw) for seed in seeds}
    res = run_jobs({keys[s]: job(s) for s in seeds}, cache, progress=progress, desc=f"{model} runs")
    return [res[keys[s]] for s in seeds]


def unified_job(spec: dict) -> dict:
    """One run of :func:`unified_runs` rebuilt from its description: ``{"data": a data spec (mpe.data.from_spec),
    "model": a registry name, "seed": the initialisation and minibatch order, "offline": bool, "train": mpe.train.train
    keywords, "device": "cpu" | "cuda" | ...}``."""
    from . import get_device
    from .data import from_spec
    from .models import get_model

    data = from_spec(spec["data"])
    net = get_model(spec["model"], data.shape, data.n_classes, seed=spec["seed"]).to(get_device(spec["device"]))
    return unified_run(net, data, offline=spec["offline"], seed=spec["seed"], **spec["train"])


def partition_job(spec: dict) -> torch.Tensor:
    """Toneva et al.'s Fig. 4 protocol as a job described by data: a fresh model trained on partition ``first``, then
    on ``second``, each for ``train["epochs"]`` epochs with the per-example ``weight_decay`` (δ = weight_decay ·
    partition size), recording the accuracy on both partitions at every epoch end. ``spec``: ``{"data": a data spec,
    "model": a registry name, "seed": initialisation and minibatch order, "first", "second": training-set indices,
    "train": mpe.train.train keywords, "weight_decay": float, "device": str}``. Returns (2 partitions, 2 · epochs)."""
    from . import get_device
    from .data import from_spec
    from .models import get_model
    from .train import PerExampleRecorder, train

    data = from_spec(spec["data"])
    net = get_model(spec["model"], data.shape, data.n_classes, seed=spec["seed"]).to(get_device(spec["device"]))
    parts = [torch.as_tensor(spec[k]).long() for k in ("first", "second")]
    rec = [PerExampleRecorder(data.x_train[p], data.y_train[p]) for p in parts]
    for part in parts:
        train(net, data.x_train[part], data.y_train[part], seed=spec["seed"], callbacks=rec,
              **dict(spec["train"], delta=spec["weight_decay"] * len(part)))
    return torch.stack([r.result()["correct"].mean(1) for r in rec])


def combine_runs(measures: list[dict]) -> dict:
    """Combine :func:`regularity` outputs of several seeds as Toneva and the notes do (§1.3e): ``cb`` and
    ``cb_norm`` are averaged, ``events`` and ``events_for_sorting`` summed, ``never`` holds where every run never
    classified the example correctly."""
    stack = {k: torch.stack([m[k] for m in measures]) for k in measures[0]}
    return dict(cb=stack["cb"].mean(0), cb_norm=stack["cb_norm"].mean(0), events=stack["events"].sum(0),
                events_for_sorting=stack["events_for_sorting"].sum(0), never=stack["never"].all(0))


def first_learned(correct: torch.Tensor) -> torch.Tensor:
    """The first evaluation (1-based) at which each example is correct, NaN if never; (T, N) -> (N,)."""
    c = torch.as_tensor(correct) == 1
    first = c.float().argmax(0).float() + 1
    return torch.where(c.any(0), first, torch.full_like(first, float("nan")))


def unforgettable(correct: torch.Tensor) -> torch.Tensor:
    """Toneva's unforgettable examples (N,) bool: learned at some point and never misclassified afterwards.
    Never-learned examples are *not* unforgettable."""
    r = regularity(correct)
    return ~r["never"] & (r["events"] == 0)


def misclassification_margin(correct: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Toneva's misclassification margin (N,): the mean margin at an example's forgetting events (the visits
    where it was wrong right after being right), NaN for examples never forgotten. ``correct``, ``margins`` (T, N)."""
    c = torch.as_tensor(correct) == 1
    forgot = torch.zeros_like(c)
    forgot[1:] = c[:-1] & ~c[1:]
    total = torch.where(forgot, margins, torch.zeros_like(margins)).sum(0)
    return total / forgot.sum(0)  # 0/0 = NaN for examples with no events


def ranking(score: torch.Tensor, descending: bool = False, seed: int = 0) -> torch.Tensor:
    """Indices (N,) that sort ``score`` with ties broken at random (the Toneva paper's rule; its code used argsort
    order, notes pitfall 4)."""
    score = torch.as_tensor(score, dtype=torch.float64)
    perm = torch.randperm(len(score), generator=torch.Generator().manual_seed(seed))
    order = torch.sort(score[perm], descending=descending, stable=True).indices
    return perm[order]


def windows(order: torch.Tensor, width: int, stride: int) -> list[tuple[int, torch.Tensor]]:
    """Toneva's sliding-window removal (Fig. 5 right): consecutive blocks ``order[s:s+width]`` for s = 0, stride, ...
    while the block is complete; returns [(s, indices)]."""
    if not 0 < width <= len(order) or stride <= 0:
        raise ValueError(f"need 0 < width <= {len(order)} and stride > 0, got width={width}, stride={stride}")
    return [(s, order[s:s + width]) for s in range(0, len(order) - width + 1, stride)]


def cscore_splits(n: int, ratios=(0.25, 0.5, 0.75), runs: int = 4, seed: int = 0) -> list[tuple]:
    """The hold-out runs of :func:`cscore_holdout`: for each ratio s, ``runs`` runs that train on ⌊s N⌋ examples
    and hold out the other h = N − ⌊s N⌋. The runs come in rounds of m = ⌈N / h⌉: a round draws one permutation and
    its run j holds out the window j·h … j·h + h − 1 of it (cyclically), so that every example is held out at least
    once per complete round — every example gets an estimate at every ratio, instead of the independent draws
    leaving (1 − h/N)^runs of them without one. Returns [(ratio index, training indices, held-out indices, run
    seed)], ratio by ratio."""
    if not all(0 < s < 1 for s in ratios) or runs < 1:
        raise ValueError(f"ratios must lie in (0, 1) and runs >= 1, got {ratios}, {runs}")
    splits = []
    for i, s in enumerate(ratios):
        k = int(s * n)
        h = n - k
        m = -(-n // h)  # runs per round
        for r in range(runs):
            run_seed = seed * 100_003 + i * 1009 + r
            round_seed = seed * 100_003 + i * 1009 + 500 + r // m
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(round_seed))
            held = perm[(torch.arange(h) + (r % m) * h) % n]
            keep = torch.ones(n, dtype=torch.bool)
            keep[held] = False
            splits.append((i, torch.nonzero(keep).flatten(), held, run_seed))
    return splits


def cscore_from_runs(splits: list, correct: list, n: int) -> dict:
    """C-scores from the runs of :func:`cscore_splits`: ``correct[j]`` is run j's correctness on its held-out
    examples (len(heldout),) or on all N training examples (N,), of which the held-out ones are used. Per ratio, an
    example's score is its mean correctness over the runs that held it out; ``score`` (N,) averages the ratios
    (Jiang's "integral" C-score), and is NaN for an example without an estimate at some ratio (averaging only the
    ratios it has would mix estimands: smaller training sets give lower scores). Returns ``score``, ``per_ratio``
    (R, N) and ``counts`` (R, N)."""
    n_ratios = max(i for i, *_ in splits) + 1
    hits, counts = torch.zeros(n_ratios, n), torch.zeros(n_ratios, n)
    for (i, _, ho, _), c in zip(splits, correct):
        c = torch.as_tensor(c).float().cpu()
        hits[i, ho] += c[ho] if len(c) == n and len(ho) != n else c
        counts[i, ho] += 1
    per_ratio = hits / counts
    return dict(score=per_ratio.mean(0), per_ratio=per_ratio, counts=counts)


def cscore_holdout(fit_predict, n: int, ratios=(0.25, 0.5, 0.75), runs: int = 4, seed: int = 0, cache=None,
                   tag: dict | None = None, progress: bool = True) -> dict:
    r"""Hold-out estimate of Jiang et al.'s consistency score C(x, y) = E_{D ~ P^n}[P(f(x; A(D)) = y)].

    For each run of :func:`cscore_splits`, ``fit_predict(train_idx, heldout_idx, run_seed)`` trains on the subset
    and returns the correctness (len(heldout),) of the held-out examples; :func:`cscore_from_runs` averages them.
    Every run is a cached job (:func:`mpe.retrain.run_jobs`), keyed by ``tag`` (data, model, training settings).
    For a named data set, ``mpe.retrain.run_specs(fit_subset, ...)`` over the same splits (evaluation
    "train_correct") runs the same sweep as jobs described by data, many models at once (the C-score notebook).
    """
    from .retrain import job_key, run_jobs

    splits = cscore_splits(n, ratios, runs, seed)
    keys = [job_key(study="cscore", ratio=ratios[i], run=j % runs, seed=seed, n=n, **(tag or {}))
            for j, (i, *_) in enumerate(splits)]
    jobs = {key: (lambda tr=tr, ho=ho, rs=rs: torch.as_tensor(fit_predict(tr, ho, rs)).float().cpu())
            for key, (_, tr, ho, rs) in zip(keys, splits)}
    res = run_jobs(jobs, cache, progress=progress, desc="C-score hold-out runs")
    return cscore_from_runs(splits, [res[k] for k in keys], n)


def detection_curve(score: torch.Tensor, positive: torch.Tensor, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Inspect examples from the highest ``score`` down (ties at random): returns (fraction checked (N+1,),
    fraction of the ``positive`` examples found (N+1,)), both starting at 0. Random inspection gives the diagonal."""
    positive = torch.as_tensor(positive, dtype=torch.bool)
    if not positive.any():
        raise ValueError("no positive examples to find")
    order = ranking(score, descending=True, seed=seed)
    found = torch.cat([torch.zeros(1), positive[order].float().cumsum(0)]) / positive.sum()
    return torch.arange(len(order) + 1) / len(order), found


def binned_accuracy(correct: torch.Tensor, score: torch.Tensor, edges) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy of each model per score bin: ``correct`` (models, M) 0/1, ``score`` (M,), bins [e_k, e_{k+1})
    (the last one closed). Returns (accuracy (models, B) with NaN for empty bins, counts (B,))."""
    edges = torch.as_tensor(edges, dtype=torch.float64)
    b = (torch.bucketize(torch.as_tensor(score, dtype=torch.float64), edges, right=True) - 1).clamp(max=len(edges) - 2)
    inside = (torch.as_tensor(score, dtype=torch.float64) >= edges[0]) & (torch.as_tensor(score) <= edges[-1])
    correct = torch.as_tensor(correct, dtype=torch.float)
    acc = torch.full((correct.shape[0], len(edges) - 1), float("nan"))
    counts = torch.zeros(len(edges) - 1, dtype=torch.long)
    for k in range(len(edges) - 1):
        m = inside & (b == k)
        counts[k] = int(m.sum())
        if counts[k]:
            acc[:, k] = correct[:, m].mean(1)
    return acc, counts
