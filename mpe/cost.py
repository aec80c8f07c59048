r"""What a run costs: measured seconds per training step of each model the paper profiles use.

A paper-profile notebook is mostly minibatch training (retraining sweeps, long runs, many seeds), so its time is,
to first order, the number of optimiser steps times the time of one step of its model at its batch size:

    time ≈ Σ_runs  epochs · ⌈N / B⌉ · t_step(model, B)

:func:`step_times` measures t_step with :func:`mpe.train.train` itself (the loop the notebooks run, with its data
movement and per-step synchronisation) on synthetic inputs of the model's shape:

    python -m mpe.cost bench --device cuda [--models lenet5 resnet18] [--batch-sizes 64 128] [--out FILE.csv]

Where t_step barely moves with B, a model is bound by per-step overhead (kernel launches, Python) rather than by
arithmetic, and many small runs are better stacked or fanned out than run one after another. The table measured on
one GPU is kept in ``figures/paper/step_times-<device>.csv``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from .models import get_model
from .train import train

__all__ = ["MODEL_INPUTS", "step_time", "step_times"]

# input shape and classes each model is built for in the paper profiles
_MNIST, _CIFAR = ((1, 28, 28), 10), ((3, 32, 32), 10)
MODEL_INPUTS = {"small_mlp": _MNIST, "large_mlp": _MNIST, "lenet5": _MNIST, "mnist_example_cnn": _MNIST,
                "toneva_mnist_cnn": _MNIST, "jiang_mlp": _MNIST, "laftr_mlp": _MNIST, "cnn_3c3d": _CIFAR,
                "resnet20_frn": _CIFAR, "resnet18": _CIFAR, "resnet18_nobn": _CIFAR, "cifarnet": ((3, 32, 32), 60),
                "wrn28_10": _CIFAR}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(model: str, batch_size: int, device="cpu", steps: int = 20, warmup: int = 3) -> float:
    """Seconds per SGD step of ``model`` at ``batch_size`` on ``device``: one epoch of :func:`mpe.train.train` over
    ``steps`` minibatches of random data, timed after a ``warmup`` epoch (cuDNN autotuning, allocator)."""
    if model not in MODEL_INPUTS:
        raise ValueError(f"no input shape for model {model!r}; known: {', '.join(MODEL_INPUTS)}")
    if batch_size < 1 or steps < 1:
        raise ValueError(f"batch_size and steps must be positive, got {batch_size}, {steps}")
    device = torch.device(device)
    shape, k = MODEL_INPUTS[model]
    g = torch.Generator().manual_seed(0)
    net = get_model(model, shape, k, seed=0).to(device)
    x = torch.randn(batch_size * steps, *shape, generator=g)
    y = torch.randint(0, k, (batch_size * steps,), generator=g)
    train(net, x[:batch_size * warmup], y[:batch_size * warmup], epochs=1, lr=1e-3, batch_size=batch_size)
    _sync(device)
    start = time.perf_counter()
    train(net, x, y, epochs=1, lr=1e-3, batch_size=batch_size)
    _sync(device)
    return (time.perf_counter() - start) / steps


def step_times(models, batch_sizes, device="cpu", steps: int = 20, progress: bool = False) -> list[dict]:
    """One row per (model, batch size): parameters, seconds per step, examples per second, and how many epochs of
    60,000 examples one hour holds (for sizing runs)."""
    rows = []
    todo = [(m, b) for m in models for b in batch_sizes]
    if progress:
        from tqdm.auto import tqdm

        todo = tqdm(todo, desc="step times")
    for m, b in todo:
        t = step_time(m, b, device, steps)
        shape, k = MODEL_INPUTS[m]
        n_params = sum(p.numel() for p in get_model(m, shape, k).parameters())
        rows.append(dict(model=m, batch_size=b, params=n_params, s_per_step=t, examples_per_s=b / t,
                         epochs_per_hour_60k=3600 / (math.ceil(60000 / b) * t)))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mpe.cost", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="seconds per training step of each model at each batch size")
    b.add_argument("--device", default="cpu")
    b.add_argument("--models", nargs="+", default=list(MODEL_INPUTS))
    b.add_argument("--batch-sizes", nargs="+", type=int, default=[8, 64, 128, 256, 512])
    b.add_argument("--steps", type=int, default=20)
    b.add_argument("--out", default=None, help="also write the table as CSV")
    a = ap.parse_args(argv)
    import pandas as pd

    from . import get_device

    try:
        rows = step_times(a.models, a.batch_sizes, get_device(a.device), a.steps, progress=True)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    table = pd.DataFrame(rows)
    if a.out:
        table.to_csv(a.out, index=False)
    print(table.to_markdown(index=False, floatfmt=".4g"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
