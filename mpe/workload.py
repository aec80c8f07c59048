r"""The training a notebook does, as a formula of its parameters, and what that costs on a GPU before it runs.

Nearly all of a paper-profile run is minibatch training: long runs, retraining sweeps, seeds. For each notebook,
:data:`FORMULAS` gives the training runs a run of it does from its parameters alone (the notebook's defaults, then
the profile's file: :func:`mpe.harness.parameters`), as :class:`Runs` rows: so many runs of a model on n examples
for so many epochs at a batch size. :func:`tally` sums them the way :func:`mpe.train.work` sums what a run actually
trained, and ``tests/test_paper_profiles.py`` checks the two against each other on every shrunk paper profile, so a
formula cannot drift from its notebook. Full-batch L-BFGS stops when it has converged: its rows are upper bounds.

Time on a GPU is then, to first order,

    time ≈ Σ_runs  count · epochs · ⌈n / B⌉ · t_step(model, B),

with t_step measured (``python -m mpe.cost bench --device cuda --out FILE``; the H200's table is
``figures/paper/step_times-nvidia-h200.csv``) or, for a model the table lacks, modelled: t_step = max(t_launch,
3 · F(model) · B / R), with F the forward FLOPs of one example (counted by torch's FlopCounterMode), the backward pass
twice the forward, an assumed sustained R = :data:`ASSUMED_FLOPS` and a floor t_launch = :data:`ASSUMED_STEP_FLOOR_S`
for small models, whose steps are bound by kernel launches rather than arithmetic. The retraining sweeps of
:mod:`mpe.retrain` stack up to :data:`STACK` models of a BatchNorm-free architecture per vmapped step on a GPU; such a
step is timed as one model's step at that many times the batch. An L-BFGS iteration takes at least
:data:`LBFGS_ITERATION_FLOOR_S` (measured). Work outside the training loop (Jacobians, kernels,
posteriors, PBRF solves) is not counted. The memory (:func:`peak_bytes`) is the training set, and four copies of the
parameters and one minibatch's activations per model trained at once. On G GPUs (:func:`wall_hours`), a sweep's
jobs spread over them with Dask, its programs cut into a share per GPU as :func:`mpe.retrain.run_specs` cuts them,
while the runs a notebook trains itself take their GPU-hours; which runs are a sweep's jobs is part of each formula,
and checked against the ledger like its runs. ``python -m mpe.harness cost`` prints the table
(figures/paper/COST.md).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

from .retrain import CHUNK

__all__ = ["Runs", "FORMULAS", "runs_of", "tally", "compare", "step_seconds", "model_size", "stackable", "stack_of",
           "peak_bytes", "wall_hours", "estimate", "ASSUMED_FLOPS", "ASSUMED_STEP_FLOOR_S", "STACK"]

ASSUMED_FLOPS = 20e12  # sustained float32/TF32 FLOP/s of one modern data-centre GPU (A100/H100 class) on these models
ASSUMED_STEP_FLOOR_S = 2e-3  # a training step of a small model: kernel launches and Python, not arithmetic
STACK = CHUNK  # models per vmapped program in mpe.retrain's sweeps
# one full-batch L-BFGS iteration of a small model: the two-loop recursion over 50 stored pairs and the line search
# are hundreds of small kernels. Measured on the H200: mpe-table1's float64 retrains of softmax regression on 4,000
# images, at most 200 iterations each, took about 2.6 s (figures/paper/README.md)
LBFGS_ITERATION_FLOOR_S = 2.6 / 200


@dataclass(frozen=True)
class Runs:
    """``count`` training runs of ``model`` (its name in :data:`mpe.models.MODELS`, or the class name of a model
    built otherwise) on ``n`` examples for ``epochs`` epochs at ``batch_size`` (None: full batch). ``bound``: an
    upper bound (full-batch L-BFGS iterations, which stop once converged; or runs that may coincide, as identical
    runs of a sweep are trained once). ``stacked``: a sweep of :mod:`mpe.retrain` (``run_specs(fit_subset)``,
    ``subset_fits``, ``retrained_outputs``), which on a GPU trains up to :data:`STACK` models of a vectorisable architecture per
    vmapped step (:func:`mpe.train.train_many`). ``jobs``: the runs are jobs of such sweeps (``run_jobs``,
    ``run_specs``; stacked runs always are), which a Dask executor spreads over workers, in ``sweeps`` calls of
    equal size one after another; else the notebook's own process trains them one after another."""
    model: str
    count: int
    n: int
    epochs: int
    batch_size: int | None
    bound: bool = False
    stacked: bool = False
    lbfgs: bool = False
    jobs: bool = False
    sweeps: int = 1

    @property
    def batch(self):
        return "full" if self.batch_size is None or self.batch_size >= self.n else self.batch_size

    @property
    def steps_per_run(self) -> int:
        return self.epochs * (1 if self.batch == "full" else math.ceil(self.n / self.batch_size))

    @property
    def steps(self) -> int:
        return self.count * self.steps_per_run

    @property
    def spread(self) -> bool:
        return self.jobs or self.stacked


def lbfgs(model: str, count: int, n: int, iters: int, jobs: bool = False) -> Runs:
    """``count`` full-batch L-BFGS runs of at most ``iters`` iterations (one iteration: one step, all n examples)."""
    return Runs(model, count, n, iters, None, bound=True, lbfgs=True, jobs=jobs)


def tally(runs: list[Runs]) -> dict:
    """The runs summed as :func:`mpe.train.work` sums a run's training: {"<model> @ <batch>": {runs, steps,
    examples, jobs, bound}}."""
    out: dict = {}
    for r in runs:
        if r.count == 0:
            continue
        t = out.setdefault(f"{r.model} @ {r.batch}", dict(runs=0, steps=0, examples=0, jobs=0, bound=False))
        t["runs"] += r.count
        t["jobs"] += r.count * r.spread
        t["steps"] += r.steps
        t["examples"] += r.count * r.epochs * r.n
        t["bound"] |= r.bound
    return dict(sorted(out.items()))


def compare(expected: dict, measured: dict, rtol: float = 0.05) -> list[str]:
    """Where a formula's :func:`tally` and a run's measured :func:`mpe.train.work` disagree (empty: they agree).
    Runs and the runs trained as a sweep's jobs must match exactly, steps and examples within ``rtol`` (subset sizes
    from per-class rounding are not known to a formula); for rows with a bound, each is at most the bound."""
    problems = []
    for key in sorted(set(expected) | set(measured)):
        e, m = expected.get(key), measured.get(key)
        if e is None or m is None:
            problems.append(f"{key}: formula {e}, measured {m}")
            continue
        if not (0 < m["runs"] <= e["runs"] if e["bound"] else m["runs"] == e["runs"]):
            problems.append(f"{key}: formula {'at most ' * e['bound']}{e['runs']} runs, measured {m['runs']}")
        if not (m["jobs"] <= e["jobs"] if e["bound"] else m["jobs"] == e["jobs"]):
            problems.append(f"{key}: formula {'at most ' * e['bound']}{e['jobs']} runs as a sweep's jobs, "
                            f"measured {m['jobs']}")
        for what in ("steps", "examples"):
            ok = (0 < m[what] <= e[what]) if e["bound"] else abs(m[what] - e[what]) <= rtol * e[what]
            if not ok:
                problems.append(f"{key}: formula {'at most ' * e['bound']}{e[what]} {what}, measured {m[what]}")
    return problems


# ----------------------------------------------------------------------------------------------------------------
# One formula per notebook: the runs a run of it trains, from its parameters p (a cache that is empty)
# ----------------------------------------------------------------------------------------------------------------
FORMULAS: dict = {}


def formula(nb_id: str):
    def register(fn):
        FORMULAS[nb_id] = fn
        return fn
    return register


def runs_of(nb_id: str, params: dict) -> list[Runs]:
    """The training runs of notebook ``nb_id`` with parameters ``params`` (see :data:`FORMULAS`)."""
    if nb_id not in FORMULAS:
        raise KeyError(f"no workload formula for {nb_id}; known: {', '.join(sorted(FORMULAS))}")
    return FORMULAS[nb_id](params)


def _per_panel(p: dict, *names):
    """Rows of the per-panel lists ``names`` of p, zipped (scalars repeated)."""
    n = max(len(p[k]) for k in names if isinstance(p[k], list))
    return list(zip(*[p[k] if isinstance(p[k], list) else [p[k]] * n for k in names]))


# MPE ------------------------------------------------------------------------------------------------------------
@formula("mpe-theorems")
@formula("mpe-fig11a")
def _nothing(p):  # closed forms and the VON/online-Newton loops of mpe.exact and mpe.blr: no minibatch training
    return []


@formula("mpe-fig1")
def _mpe_fig1(p):  # (a) online Newton on a toy problem (mpe.blr); (b) one iBLR run watched by the LOO tracker
    return [Runs(p["model"], 1, p["n_train"], p["epochs"], p["batch_size"])]


@formula("mpe-fig5")
def _mpe_fig5(p):  # iBLR, and one SGD run watched by both the diag-GGN and the K-FAC trackers
    return [Runs(p["model"], 2, p["n_train"], p["epochs"], p["batch_size"])]


@formula("mpe-fig8")
def _mpe_fig8(p):  # per row: iBLR and one SGD run (both trackers)
    return [Runs(m, 2, n, e, b) for m, n, e, b in _per_panel(p, "models", "n_train", "epochs", "batch_sizes")]


@formula("mpe-fig9")
def _mpe_fig9(p):  # one AdamW run, both trackers
    return [Runs(p["model"], 1, p["n_train"], p["epochs"], p["batch_size"])]


@formula("mpe-fig10")
def _mpe_fig10(p):  # one Adam run per batch size; with equal_steps, each multiple of the smallest for its steps
    small = min(p["batch_sizes"])
    runs = [Runs(p["model"], 1, p["n_train"], p["epochs"], b) for b in p["batch_sizes"]]
    if p["equal_steps"]:
        runs += [Runs(p["model"], 1, p["n_train"], p["epochs"] * b // small, b)
                 for b in p["batch_sizes"] if b != small and b % small == 0]
    return runs


@formula("mpe-fig3b")
def _mpe_fig3b(p):  # one iBLR run per panel
    return [Runs(m, 1, n, e, b) for m, n, e, b in _per_panel(p, "models", "n_train", "epochs", "batch_sizes")]


@formula("mpe-fig2")
def _mpe_fig2(p):  # per panel: θ* by L-BFGS; warm-started L-BFGS retrains without each removed example and a
    runs = []      # reference on all the data; n_check of them again with check_iters; the paper's SGD retrain
    for m, n, fit, r, rit, paper in _per_panel(p, "models", "n_train", "fit_iters", "n_removed", "retrain_iters",
                                                "paper_retrain"):
        runs += [lbfgs(m, 1, n, fit), lbfgs(m, 1 + r, n, rit, jobs=True)]
        if p["n_check"]:
            runs.append(lbfgs(m, 1 + p["n_check"], n, p["check_iters"], jobs=True))
        if paper:
            runs.append(Runs(m, 1 + r, n - 1, p["paper_retrain_epochs"], 256, stacked=True))
    return runs


@formula("mpe-fig3a")
def _mpe_fig3a(p):
    """Per panel and seed: θ* by SGD, a warm-started SGD retrain without each of the 10 classes (9/10 of the data
    each, on average) and a reference; with converged_truth, the same by L-BFGS, on the first seed only."""
    runs, s = [], len(p["seeds"])
    for m, n, fit, re in _per_panel(p, "models", "n_train", "fit_epochs", "retrain_epochs"):
        runs += [Runs(m, s, n, fit, p["batch_size"]), Runs(m, s, n, re, p["batch_size"], stacked=True),
                 Runs(m, 10 * s, round(0.9 * n), re, p["batch_size"], stacked=True)]
        if p["converged_truth"]:
            runs.append(lbfgs(m, 11, n, 200, jobs=True))
    return runs


@formula("mpe-fig4")
def _mpe_fig4(p):  # one L-BFGS fit per δ, per panel (MLP; softmax regression)
    return [lbfgs(p["model"], p["n_deltas"], p["n_train"], p["fit_iters"], jobs=True),
            lbfgs("softmax_regression", p["n_deltas"], p["glm_n_train"], p["fit_iters"], jobs=True)]


@formula("mpe-fig6")
def _mpe_fig6(p):  # (a) USPS-like digits pair: θ*, a retrain per group + reference, check_groups with 3x the
    n_a = 360      # iterations; (b) the same on MNIST. n_a: the digits pair's examples (about 180 per digit);
    net = "Sequential"  # panel (a)'s network is built by mpe.models.mlp with the paper's widths
    return [lbfgs(net, 1, n_a, p["fit_iters"]), lbfgs(net, 1 + p["n_groups"], n_a, p["retrain_iters"], jobs=True),
            lbfgs(net, 1 + p["check_groups"], n_a, 3 * p["retrain_iters"], jobs=True),
            lbfgs(p["b_model"], 1, p["b_n_train"], p["b_fit_iters"]),
            lbfgs(p["b_model"], 1 + p["b_n_groups"], p["b_n_train"], p["b_retrain_iters"], jobs=True)]


@formula("mpe-table1")
def _mpe_table1(p):  # θ* by L-BFGS; iBLR, Adam and SGD runs; a warm-started L-BFGS retrain per removed example
    return [lbfgs(p["model"], 1, p["n_train"], 500), Runs(p["model"], 3, p["n_train"], p["epochs"], p["batch_size"]),
            lbfgs(p["model"], 1 + p["n_removed"], p["n_train"], p["retrain_iters"], jobs=True)]


# Sample regularity ------------------------------------------------------------------------------------------------
def _ranking_runs(p, seeds="seeds", model="model", sweeps=1):  # mpe.regularity.unified_runs: one run per seed, jobs
    return Runs(p[model], len(p[seeds]), p["n_train"], p["epochs"], p["batch_size"], jobs=True, sweeps=sweeps)


@formula("regularity-distributions")
@formula("regularity-dynamics")
def _regularity_runs(p):
    return [_ranking_runs(p)]


@formula("regularity-toneva")
def _regularity_toneva(p):  # the runs, and as many on the pixel-permuted images (a sweep of one per seed)
    return [_ranking_runs(p)] + [_ranking_runs(p, sweeps=len(p["seeds"]))] * bool(p["permuted"])


@formula("regularity-noise")
def _regularity_noise(p):  # one run on the noisy labels, then one on the clean ones
    return [Runs(p["model"], 2, p["n_train"], p["epochs"], p["batch_size"], jobs=True, sweeps=2)]


@formula("regularity-robustness")
def _regularity_robustness(p):  # reference and seed variant; then another batch size, learning rate and model (1 each)
    n, e, b = p["n_train"], p["epochs"], p["batch_size"]
    return [Runs(p["model"], len(p["seeds"]), n, e, b, jobs=True), Runs(p["model"], 1, n, e, p["other_batch_size"], jobs=True),
            Runs(p["model"], 1, n, e, b, jobs=True), Runs(p["other_model"], 1, n, e, b, jobs=True)]


@formula("regularity-testselection")
def _regularity_testselection(p):  # the reference runs for CBGL; each zoo model once, zoo_epochs
    return [_ranking_runs(p)] + [Runs(m, 1, p["n_train"], p["zoo_epochs"], p["batch_size"], jobs=True) for m in p["zoo"]]


@formula("regularity-fig4")
def _regularity_fig4(p):  # ranking runs; per seed, three orders of two partitions, partition_epochs on each
    return [_ranking_runs(p), Runs(p["model"], 6 * len(p["seeds"]), p["partition"], p["partition_epochs"],
                                   p["batch_size"], bound=True, jobs=True)]  # at most: fewer where f0 or fN is smaller


@formula("regularity-cscore")
def _regularity_cscore(p):  # hold-out runs on ⌊s N⌋ examples per ratio s (estimated C-scores only); one ranking run
    n = p["n_train"]
    runs = [Runs(p["model"], 1, n, p["epochs"], p["batch_size"], jobs=True)]
    if p["cscore_source"] == "holdout":
        runs += [Runs(p["model"], p["n_runs"], int(s * n), p["epochs"], p["batch_size"], stacked=True)
                 for s in p["ratios"]]
    return runs


@formula("regularity-selection")
def _regularity_selection(p):  # ranking runs; retrains on the full data, without each fraction by each of three
    n, e, b = p["n_train"], p["epochs"], p["batch_size"]  # orders and at random, and without each sliding window
    model = p["retrain_model"] or p["model"]              # (by two orders); identical runs are trained once
    width = int(round(p["window"] * n))
    n_windows = (n - width) // width + 1
    shared = 2 * len(set(p["seeds"]) & set(p["window_seeds"])) * any(int(round(f * n)) == width for f in p["fractions"])
    # at most: where two orders remove the same examples (ties in a short run), their retrains are one
    return [_ranking_runs(p, "ranking_seeds"), Runs(model, len(p["seeds"]), n, e, b, stacked=True)] + [
        Runs(model, 4 * len(p["seeds"]), n - int(round(f * n)), e, b, bound=True, stacked=True)
        for f in p["fractions"]] + [
        Runs(model, 2 * n_windows * len(p["window_seeds"]) - shared, n - width, e, b, bound=True, stacked=True)]


# lpNTK ------------------------------------------------------------------------------------------------------------
@formula("lpntk-theorem1")
def _lpntk_theorem1(p):  # kernels of untrained networks of growing width
    return []


@formula("lpntk-fig2")
@formula("lpntk-statistics")
def _lpntk_one_run(p):  # one run; its checkpoints or its final network give the kernels
    return [Runs(p["model"], 1, p["n_train"], p["epochs"], p["batch_size"])]


@formula("lpntk-table1")
def _lpntk_table1(p):  # one SGD run per seed, for the epochs that hold n_steps steps
    per_epoch = math.ceil(p["n_train"] / p["batch_size"])
    return [Runs(p["model"], len(p["seeds"]), p["n_train"], -(-p["n_steps"] // per_epoch), p["batch_size"])]


@formula("lpntk-gaussians")
def _lpntk_gaussians(p):  # per seed: full-batch Adam on all the data and on a kept share by each of four rules
    n = p["n_train"]
    return [Runs("Sequential", p["seeds"], n, p["epochs"], None),
            Runs("Sequential", 4 * p["seeds"], int(p["keep"] * n), p["epochs"], None)]


@formula("lpntk-interactions")
def _lpntk_interactions(p):
    """Per ranking network (kernel seed): its training, then n_runs runs per partner set (a target and its partners
    per class) of each of the 3 conditions."""
    k = len(p["kernel_seeds"])
    return [Runs(p["model"], k, p["n_train"], p["kernel_epochs"], 128),
            Runs(p["model"], 3 * p["n_runs"] * k, 10 * (1 + p["n_partners"]), p["epochs"], p["batch_size"],
                 stacked=True)]


@formula("lpntk-difficulty")
def _lpntk_difficulty(p):  # every quad-tree level's subsets; the equal-step control; the universal set again
    s, e, b, k = p["sizes"], p["epochs"], p["batch_size"], 10
    stretch = round(math.ceil(s[0] * k / b) / math.ceil(s[1] * k / b))
    equal = p["equal_step_subsets"] if stretch > 1 else 0  # with no stretch they are the level's own runs
    return [Runs(p["model"], s[0] // m, m * k, e, b, stacked=True) for m in s] + [
        Runs(p["model"], equal, s[1] * k, e * stretch, b, stacked=True), Runs(p["model"], 1, s[0] * k, e, b, jobs=True)]


@formula("lpntk-pruning")
def _lpntk_pruning(p):  # the reference run; EL2N's first epochs per seed; retrains on the full data and on each
    n, e, b, seeds = p["n_train"], p["epochs"], p["batch_size"], len(p["seeds"])  # rule's pruned set (9 rules)

    def kept(f):  # each rule removes round(f n_c) of each class c (taken as balanced, 10 classes)
        return n - 10 * round(f * n / 10)

    def epochs(k):
        return max(1, round(e * n / k)) if p["equal_steps"] else e

    return [Runs(p["model"], 1, n, e, b), Runs(p["model"], seeds, n, e, b, stacked=True),
            Runs(p["model"], seeds, n, p["el2n_epochs"], b)] + [
        Runs(p["model"], 9 * seeds, kept(f), epochs(kept(f)), b, stacked=True) for f in p["fractions"]]


# LAFTR ------------------------------------------------------------------------------------------------------------
TRAIN_SIZES = {"digits": 1000, "mnist5k": 4000, "mnist": 60000, "fmnist": 60000, "cifar10": 50000, "cifar100": 50000,
               "synthetic-cifar10": 500}  # training examples of each data set of mpe.data (tested against it)


@formula("laftr-fig1")
def _laftr_fig1(p):  # the old and the new 1-D regression networks, full-batch Adam (the memory table trains nothing)
    return [Runs("Sequential", 1, p["n_points"], p["epochs_old"], None),
            Runs("Sequential", 1, p["n_points"], p["epochs_new"], None)]


@formula("laftr-fsd")
def _laftr_fsd(p):  # task A, then task B (the pixel-permuted images) watched at checkpoints
    return [Runs(p["model"], 1, p["n_train"], p["epochs_a"], p["batch_size"]),
            Runs(p["model"], 1, p["n_train"], p["epochs_b"], p["batch_size"])]


@formula("laftr-influence")
def _laftr_influence(p):  # the network by L-BFGS (the PBRF solves are not training runs)
    return [lbfgs("mlp", 1, TRAIN_SIZES[p["dataset"]], p["fit_iters"])]


@formula("laftr-mislabeled")
def _laftr_mislabeled(p):  # one L-BFGS network per seed on its own noisy subset
    return [lbfgs("mlp", len(p["seeds"]), p["n_train"], p["fit_iters"])]


def _task_sizes(p, suite: str) -> tuple[str, list[int]]:
    """(model, training examples of each task) of a continual-learning benchmark (mpe.continual.benchmark)."""
    if suite == "split_cifar":  # CIFAR-10, then groups of ten classes of CIFAR-100 (of a 10-class stand-in: all)
        first, second = p["cifar_datasets"]
        group = TRAIN_SIZES[second] * 10 // (100 if second == "cifar100" else 10)
        return "cifarnet", [TRAIN_SIZES[first]] + [group] * (p["cifar_tasks"] - 1)
    n = TRAIN_SIZES[p["dataset"]]
    return "mlp", [n // 5] * 5 if suite == "split_mnist" else [n] * p.get("n_permuted", p.get("n_tasks"))


def _continual(p, suite: str, n_methods: int, n_tuned: int) -> list[Runs]:
    """Each tuned method once per λ on the validation tasks (1 − val_frac of each task), each method once per seed
    on the tasks; every run trains the tasks in order."""
    model, sizes = _task_sizes(p, suite)
    e, b = p["epochs"], p["batch_size"]  # every run a job (mpe.continual.continual_job): the tuning sweep, then the runs
    return [Runs(model, n_tuned * len(p["lams"]), n - max(1, int(p["val_frac"] * n)), e, b, jobs=True)
            for n in sizes] + [Runs(model, n_methods * len(p["seeds"]), n, e, b, jobs=True) for n in sizes]


@formula("laftr-continual")
def _laftr_continual(p):
    tuned = len([m for m in p["methods"] if m != "finetune"])
    return [r for s in p["suites"] for r in _continual(dict(p, n_tasks=p["n_permuted"]), s, len(p["methods"]), tuned)]


@formula("laftr-ablations")
def _laftr_ablations(p):  # five variants of LAFTR
    return _continual(dict(p, n_permuted=p["n_tasks"]), p["suite"], 5, 5)


# ----------------------------------------------------------------------------------------------------------------
# Time
# ----------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def forward_flops(model: str) -> float | None:
    """Forward FLOPs of one example through ``model`` at its paper-profile input shape (mpe.cost.MODEL_INPUTS), or
    None for a model without a known shape."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from .cost import MODEL_INPUTS
    from .models import get_model

    if model not in MODEL_INPUTS:
        return None
    shape, k = MODEL_INPUTS[model]
    net = get_model(model, shape, k, seed=0).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(torch.zeros(1, *shape))
    return float(counter.get_total_flops())


@functools.lru_cache(maxsize=None)
def model_size(model: str) -> tuple[int, int, int] | None:
    """(parameters, activations per example, input numbers per example) of ``model`` at its paper-profile input shape,
    or None for a model without a known shape. The activations are the outputs of every leaf module for one
    example: what autograd keeps for the backward pass, to first order."""
    import torch

    from .cost import MODEL_INPUTS
    from .models import get_model

    if model not in MODEL_INPUTS:
        return None
    shape, k = MODEL_INPUTS[model]
    net = get_model(model, shape, k, seed=0)
    outputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: outputs.append(o.numel()))
             for m in net.modules() if not list(m.children())]
    with torch.no_grad():
        net(torch.zeros(1, *shape))
    for h in hooks:
        h.remove()
    return sum(p.numel() for p in net.parameters()), sum(outputs), math.prod(shape)


@functools.lru_cache(maxsize=None)
def stackable(model: str) -> bool:
    """Whether :func:`mpe.train.train_many` can stack ``model`` (SGD; no BatchNorm, no dropout)."""
    from .cost import MODEL_INPUTS
    from .models import get_model
    from .train import vectorisable

    if model not in MODEL_INPUTS:
        return False
    shape, k = MODEL_INPUTS[model]
    return vectorisable(get_model(model, shape, k, seed=0)) is None


def stack_of(r: Runs, count: int | None = None, gpus: int = 1) -> int:
    """How many of ``r``'s runs (or of ``count`` of them, one sweep's) share one step on a GPU: up to :data:`STACK`
    for a stacked sweep of a stackable model, else 1; over ``gpus`` GPUs, at most each one's share
    (:func:`mpe.retrain.run_specs` cuts a sweep so)."""
    count = r.count if count is None else count
    return min(count, STACK, -(-count // gpus)) if r.stacked and count > 1 and stackable(r.model) else 1


def peak_bytes(r: Runs) -> float | None:
    """Device memory of one program of ``r``, float32: its training set (the loop moves it to the device whole), and
    for each model trained at once (:func:`stack_of`) four copies of the parameters (weights, gradients, two
    optimiser moments) and one minibatch's activations. None where the model's size is unknown."""
    size = model_size(r.model)
    if size is None:
        return None
    params, acts, inputs = size
    batch = r.n if r.batch == "full" else r.batch_size
    return 4.0 * (r.n * inputs + stack_of(r) * (4 * params + batch * acts))


def step_seconds(model: str, batch: int, table: dict | None = None) -> tuple[float, bool]:
    """(seconds per training step, whether it is known). From ``table`` {(model, batch size): s_per_step} (measured
    by ``python -m mpe.cost bench``) where it has the model: the smallest batch's time below it (per-step overhead),
    linear between measured batch sizes, and beyond the largest the last slope (per-example cost) carried on. Else
    the FLOP model, max(floor, 3 F B / R) (module docstring). A model of unknown size gets the floor alone: a lower
    bound."""
    points = sorted((b, t) for (m, b), t in (table or {}).items() if m == model)
    if points:
        import numpy as np

        bs, ts = zip(*points)
        if batch <= bs[-1] or len(points) == 1:
            t = float(np.interp(batch, bs, ts))  # the smallest batch's time below it, linear in between
        else:
            t = ts[-1] + (batch - bs[-1]) * max(0.0, (ts[-1] - ts[-2]) / (bs[-1] - bs[-2]))
        return t, True
    flops = forward_flops(model)
    if flops is None:
        return ASSUMED_STEP_FLOOR_S, False
    return max(ASSUMED_STEP_FLOOR_S, 3 * flops * batch / ASSUMED_FLOPS), True


def _programs(r: Runs, count: int, table: dict | None, gpus: int = 1) -> tuple[int, float, float, bool]:
    """``count`` of ``r``'s runs as programs for ``gpus`` GPUs: (how many train :func:`stack_of` models each, the
    hours of one, the hours of the one left over with fewer models (0: none), whether the step time is known). One
    step of m models is timed as one model's step at m times the batch: the same arithmetic in one launch sequence."""
    m = stack_of(r, count, gpus)
    batch = r.n if r.batch == "full" else r.batch_size

    def hours(models):
        t, known = step_seconds(r.model, models * batch, table)
        return (max(t, LBFGS_ITERATION_FLOOR_S) if r.lbfgs else t) * r.steps_per_run / 3600, known

    full, known = hours(m)
    return count // m, full, hours(count % m)[0] if count % m else 0.0, known


def wall_hours(r: Runs, gpus: int, table: dict | None = None) -> float:
    """Hours until ``r``'s runs are trained with ``gpus`` GPUs. Runs the notebook trains itself, one after another:
    their GPU-hours. A sweep's jobs (``r.spread``): in each of ``r.sweeps`` sweeps, one after another, its programs
    (:func:`_programs`, a stacked sweep cut into a share per GPU) spread over the GPUs longest first, in waves of
    ``gpus``: the full programs take ⌈full / gpus⌉ waves, and the smaller one left over a wave of its own only where
    the full ones fill their last."""
    if not r.spread:
        full_count, full, rest, _ = _programs(r, r.count, table)
        return full_count * full + rest
    total = 0.0
    for i in range(r.sweeps):
        count = r.count // r.sweeps + (i < r.count % r.sweeps)
        if count:
            full_count, full, rest, _ = _programs(r, count, table, gpus)
            total += math.ceil(full_count / gpus) * full + (rest if full_count % gpus == 0 else 0.0)
    return total


def estimate(runs: list[Runs], table: dict | None = None, gpus: int = 8) -> dict:
    """Totals of ``runs``: runs, steps, examples, GPU-hours (:func:`step_seconds` per row; the stacked runs of a
    sweep as :func:`stack_of` models per step, :func:`_programs`), the hours on ``gpus`` GPUs with a sweep's jobs
    spread over them (:func:`wall_hours`; rows one after another), the largest :func:`peak_bytes` (GB) and the models
    whose time or memory is only a lower bound."""
    hours, wall, unknown, peak = 0.0, 0.0, set(), 0.0
    for r in runs:
        full_count, full, rest, known = _programs(r, r.count, table)
        hours += full_count * full + rest
        wall += wall_hours(r, gpus, table)
        memory = peak_bytes(r)
        peak = max(peak, memory or 0.0)
        if not known or memory is None:
            unknown.add(r.model)
    return dict(runs=sum(r.count for r in runs), steps=sum(r.steps for r in runs),
                examples=sum(r.count * r.epochs * r.n for r in runs), gpu_hours=hours, wall_hours=wall,
                peak_gb=peak / 1e9, lower_bound=sorted(unknown))


# Comparison ------------------------------------------------------------------------------------------------------
@formula("compare-attribution")
def _compare_attribution(p):  # the reference models (clean, flipped labels; the flipped run's record also gives
    n, e, b, m = p["n_train"], p["epochs"], p["batch_size"], p["model"]  # dynamics_scores) and TRAK-k's other models;
    k = len(p["orders"])                # in every order the full-data run and each leave-one-out retrain; LDS subsets
    #                                     in the first order, and again in the second (the truth's own noise)
    ensemble = p["trak_models"] - 1 if "trak" in p["methods"] else 0
    runs = [Runs(m, 2 + (k > 1) + k + ensemble, n, e, b, stacked=True),  # the flipped labels in a second order too
            Runs(m, k * p["n_loo"], n - 1, e, b, stacked=True),
            Runs(m, p["n_subsets"] * min(k, 2), int(round(p["subset_fraction"] * n)), e, b, stacked=True)]
    if "mpe-iblr" in p["methods"]:  # IVON at the trained model (lr 0) for iBLR's variance, once per IVON seed
        from .sensitivity import IBLR_EPOCHS

        runs.append(Runs(m, p["iblr_seeds"], n, IBLR_EPOCHS, min(b, n)))
    return runs
