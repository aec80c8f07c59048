r"""Continual learning with function-space regularisers (LAFTR paper, notes §1.10).

While task t is trained, every minibatch loss is the task's cross-entropy (on its own head for multi-head
benchmarks) plus

    λ · (1/t) Σ_{k<t} FSD_k(θ_k*, θ),

with θ_k* the parameters saved after task k and FSD_k one of :data:`METHODS`, all estimates of the same KL
function-space distance on task k's input distribution:

- ``"finetune"``: no regulariser;
- ``"ewc"`` / ``"kfac"``: the quadratic ½ Δθᵀ Ĝ Δθ with the diagonal / K-FAC Fisher of task k (:func:`mpe.fsd.quadratic`);
- ``"coreset"``: the exact FSD on ``n_coreset`` stored examples of task k (non-parametric);
- ``"laftr"``: the parametric LAFTR — Gaussian input statistics (μ, Σ; Cholesky cached) and one Bernoulli
  probability per ReLU unit, fresh samples at every step (:func:`mpe.fsd.laftr_bernoulli`). Options for the
  ablations: ``inputs="coreset"`` (stored inputs instead of Gaussian samples), ``gates="relu"`` (the old network's
  true gates on the sampled inputs, the official code's ``lin_act``), ``classwise=True`` (one Gaussian and one set
  of probabilities per class, FSD averaged over classes).
"""
from __future__ import annotations

import copy
import functools
import json
from dataclasses import dataclass

import torch

from . import fsd
from .data import Data, keep_classes, load, permute_pixels
from .train import predict, train

__all__ = ["Task", "split_tasks", "split_cifar_tasks", "permuted_tasks", "benchmark", "BENCHMARKS", "METHODS",
           "regulariser", "run_continual", "continual_job", "validation_tasks", "best_lambda"]

METHODS = ("finetune", "ewc", "kfac", "coreset", "laftr")
BENCHMARKS = ("split_mnist", "permuted_mnist", "split_cifar")


@dataclass
class Task:
    """One task: inputs, labels *within* its head (0..len(outputs)-1), and the logits of its head (None: all)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    outputs: list | None


def split_tasks(data: Data, groups=((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))) -> list[Task]:
    """Split MNIST: one task per class group, each with its own head (multi-head; labels relabelled 0..)."""
    tasks = []
    for g in groups:
        part = keep_classes(data, g)
        tasks.append(Task(part.x_train, part.y_train, part.x_test, part.y_test, outputs=list(g)))
    return tasks


def split_cifar_tasks(cifar10: Data, cifar100: Data, n_tasks: int = 6) -> list[Task]:
    """Split CIFAR (FROMP's benchmark, used by LAFTR; notes §3): task 0 is CIFAR-10, task k >= 1 the CIFAR-100 classes
    10(k-1) ... 10k-1 relabelled 0..9. Task k owns the logits 10k ... 10k+9 of a network with 10 ``n_tasks`` outputs
    (CifarNet: 60 for the 6 tasks of the paper; at most 11 tasks). Each dataset keeps its own normalisation."""
    if not 1 <= n_tasks <= 11:
        raise ValueError(f"Split CIFAR has 1 to 11 tasks (CIFAR-10, then ten groups of CIFAR-100), got {n_tasks}")
    tasks = [Task(cifar10.x_train, cifar10.y_train, cifar10.x_test, cifar10.y_test, outputs=list(range(10)))]
    for k in range(1, n_tasks):
        (task,) = split_tasks(cifar100, [tuple(range(10 * (k - 1), 10 * k))])
        task.outputs = list(range(10 * k, 10 * k + 10))
        tasks.append(task)
    return tasks


def permuted_tasks(data: Data, n_tasks: int) -> list[Task]:
    """Permuted MNIST: task 0 is the data as it is, task k the pixels permuted with seed k (one shared head)."""
    out = []
    for k in range(n_tasks):
        d = data if k == 0 else permute_pixels(data, seed=k)
        out.append(Task(d.x_train, d.y_train, d.x_test, d.y_test, None))
    return out


def validation_tasks(tasks: list[Task], frac: float = 0.2, seed: int = 0) -> list[Task]:
    """The same tasks with a share ``frac`` of each task's training examples held out as its test set: the tasks on
    which a hyperparameter such as λ is chosen, so that the real test sets judge only the chosen setting."""
    if not 0 < frac < 1:
        raise ValueError(f"frac must lie strictly between 0 and 1, got {frac}")
    out = []
    for k, t in enumerate(tasks):
        order = torch.randperm(len(t.x_train), generator=torch.Generator().manual_seed(seed + k))
        n_val = max(1, int(frac * len(order)))
        val, keep = order[:n_val], order[n_val:]
        out.append(Task(t.x_train[keep], t.y_train[keep], t.x_train[val], t.y_train[val], t.outputs))
    return out


def best_lambda(lams, accuracies) -> float:
    """The λ with the highest mean accuracy over the runs given as parallel sequences ``lams`` and ``accuracies``
    (several runs of one λ are averaged; ties: the smaller λ, the weaker assumption)."""
    runs = {}
    for lam, acc in zip(lams, accuracies):
        runs.setdefault(float(lam), []).append(float(acc))
    if not runs:
        raise ValueError("no λ to choose from")
    return max(sorted(runs), key=lambda lam: (sum(runs[lam]) / len(runs[lam]), -lam))


def benchmark(name: str, *, dataset: str = "mnist5k", hidden=(100, 100), n_tasks: int = 3,
              cifar_datasets=("cifar10", "cifar100")) -> tuple[str, list[Task], dict]:
    """(label, tasks, keywords of :func:`mpe.models.get_model`) of one benchmark of :data:`BENCHMARKS`:

    - ``split_mnist``: five two-class tasks of ``dataset``, an MLP with ``hidden`` ReLU layers and one 2-way head each;
    - ``permuted_mnist``: ``n_tasks`` pixel permutations of ``dataset``, the same MLP with one shared 10-way head;
    - ``split_cifar``: CIFAR-10, then ``n_tasks`` − 1 groups of ten CIFAR-100 classes (``cifar_datasets``: the two
      datasets' names), CifarNet with 10 ``n_tasks`` outputs.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}; valid choices: {', '.join(BENCHMARKS)}")
    if name == "split_cifar":
        c10, c100 = (load(n) for n in cifar_datasets)
        return (f"Split CIFAR ({n_tasks} tasks)", split_cifar_tasks(c10, c100, n_tasks),
                dict(name="cifarnet", in_shape=c10.shape, n_classes=10 * n_tasks))
    data = load(dataset)
    net = dict(name="mlp", in_shape=data.shape, n_classes=10, hidden=tuple(hidden), activation="relu")
    if name == "split_mnist":
        return "Split MNIST", split_tasks(data), net
    return f"Permuted MNIST ({n_tasks} tasks)", permuted_tasks(data, n_tasks), net


def regulariser(method: str, old: torch.nn.Module, task: Task, **kw):
    """``penalty(net) -> scalar``: the FSD between ``old`` (a frozen copy of θ_k*) and ``net`` on ``task``'s inputs
    and head, estimated by ``method`` with fresh samples at every step (:func:`mpe.fsd.estimator`; ``kw``: metric,
    n_samples, n_coreset, inputs, gates, classwise, generator)."""
    if method not in METHODS or method == "finetune":
        raise ValueError(f"unknown regulariser {method!r}; valid choices: {', '.join(METHODS[1:])}")
    dev = next(old.parameters()).device  # the statistics live beside the model
    return fsd.estimator(method, old, task.x_train.to(dev), y=task.y_train.to(dev), outputs=task.outputs,
                         resample=True, **kw)


@torch.no_grad()
def _accuracy(net, task: Task) -> float:
    logits = predict(net, task.x_test)
    if task.outputs is not None:
        logits = logits[:, task.outputs]
    return (logits.argmax(1).cpu() == task.y_test).float().mean().item()


def run_continual(tasks: list[Task], net: torch.nn.Module, method: str = "laftr", *, lam: float = 1.0,
                  reg_kw: dict | None = None, progress: bool = False, **train_kw) -> torch.Tensor:
    """Train ``net`` on the tasks in order with the regulariser ``method``; returns the accuracy matrix R (T, T),
    R[t, k] = test accuracy on task k after training task t (NaN for k > t). ``train_kw`` goes to
    :func:`mpe.train.train` (optimizer, lr, epochs, batch_size, seed, ...)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid choices: {', '.join(METHODS)}")
    R = torch.full((len(tasks), len(tasks)), float("nan"))
    penalties = []
    it = range(len(tasks))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"tasks ({method})", leave=False)
    for t in it:
        task = tasks[t]
        def reg(_, ps=tuple(penalties)):  # λ · mean over the earlier tasks
            return lam * sum(p(net) for p in ps) / len(ps)

        train(fsd.Head(net, task.outputs), task.x_train, task.y_train, penalty=reg if penalties else None, **train_kw)
        if method != "finetune":
            old = copy.deepcopy(net)  # the fsd functions detach its parameters (K-FAC needs them differentiable)
            penalties.append(regulariser(method, old, task, **(reg_kw or {})))
        for k in range(t + 1):
            R[t, k] = _accuracy(net, tasks[k])
    return R


CONTINUAL_SPEC_KEYS = ("benchmark", "validation", "method", "lam", "reg", "train", "seed", "device")


def continual_job(spec: dict) -> torch.Tensor:
    """One run of a continual-learning sweep, rebuilt from its description alone (a job of
    :func:`mpe.retrain.run_specs`, here or on a Dask worker)::

        {"benchmark": {"name": "permuted_mnist", "dataset": "mnist5k", "hidden": [100, 100], "n_tasks": 3},
                                              # benchmark()'s arguments (cifar_datasets too for split_cifar)
         "validation": {"frac": 0.2, "seed": 100},  # or None: validation_tasks() of it, on which λ is chosen
         "method": "laftr", "lam": 1.0,       # run_continual's method and λ
         "reg": {"n_samples": 40, "n_coreset": 40},  # the regulariser's keywords (mpe.fsd.estimator)
         "train": {"optimizer": "adam", "lr": 0.001, "epochs": 3, "batch_size": 128},  # mpe.train.train's, no seed
         "seed": 0,                           # the network's initialisation and the minibatch order
         "device": "cpu"}

    Returns the accuracy matrix R (T, T) of :func:`run_continual`. The tasks are built once per process."""
    from . import get_device
    from .models import get_model
    from .retrain import check_spec

    check_spec(spec, CONTINUAL_SPEC_KEYS, "continual_job")
    if "seed" in spec["train"]:
        raise ValueError("the spec's 'seed' sets the initialisation and minibatch order; remove 'seed' from 'train'")
    tasks, net_kw = _tasks(json.dumps(spec["benchmark"], sort_keys=True), json.dumps(spec["validation"], sort_keys=True))
    net = get_model(**net_kw, seed=spec["seed"]).to(get_device(spec["device"]))
    return run_continual(tasks, net, spec["method"], lam=spec["lam"], reg_kw=spec["reg"], seed=spec["seed"],
                         **spec["train"])


@functools.lru_cache(maxsize=2)
def _tasks(bench: str, validation: str) -> tuple[list[Task], dict]:
    """(tasks, network keywords) of a benchmark's JSON description, or of its validation tasks (shared by the jobs of
    this process that name them: read them, never change them in place)."""
    _, tasks, net_kw = benchmark(**json.loads(bench))
    val = json.loads(validation)
    return (tasks if val is None else validation_tasks(tasks, val["frac"], seed=val["seed"])), net_kw
