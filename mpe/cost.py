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

from .models import get_model, n_params
from .train import train

__all__ = ["MODEL_INPUTS", "peak_memory", "step_time", "step_times", "sweep_times"]

# input shape and classes each model is built for in the paper profiles
_MNIST, _CIFAR = ((1, 28, 28), 10), ((3, 32, 32), 10)
MODEL_INPUTS = {"softmax_regression": _MNIST, "small_mlp": _MNIST, "large_mlp": _MNIST, "lenet5": _MNIST,
                "small_cnn": _MNIST, "lpntk_cnn": _MNIST, "mnist_example_cnn": _MNIST,
                "toneva_mnist_cnn": _MNIST, "jiang_mlp": _MNIST, "laftr_mlp": _MNIST, "cnn_3c3d": _CIFAR,
                "resnet20_frn": _CIFAR, "resnet18": _CIFAR, "resnet18_nobn": _CIFAR, "cifarnet": ((3, 32, 32), 60),
                "wrn28_10": _CIFAR, "resnet9": ((3, 32, 32), 2)}


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
        n_par = n_params(get_model(m, shape, k))
        rows.append(dict(model=m, batch_size=b, params=n_par, s_per_step=t, examples_per_s=b / t,
                         epochs_per_hour_60k=3600 / (math.ceil(60000 / b) * t)))
    return rows


class peak_memory:
    """``with peak_memory(device) as m: ...`` then ``m.bytes``: the most memory the block held above what was in use
    when it began. On CUDA from torch's allocator statistics (exact); on a CPU from the process's resident set size,
    sampled every ``interval`` seconds in a thread (psutil), after handing the C heap's free memory back to the system
    (glibc's ``malloc_trim``, where there is one) so that memory freed before the block and reused in it counts; a
    peak shorter than the interval can be missed."""

    def __init__(self, device="cpu", interval: float = 0.005):
        self.device, self.interval, self.bytes = torch.device(device), interval, 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        import threading

        import psutil

        _trim_heap()
        process, self._stop = psutil.Process(), threading.Event()
        self._start = self._peak = process.memory_info().rss

        def sample():
            while not self._stop.is_set():
                self._peak = max(self._peak, process.memory_info().rss)
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = max(0, torch.cuda.max_memory_allocated(self.device) - self._start)
        else:
            self._stop.set()
            self._thread.join()
            self.bytes = max(0, self._peak - self._start)
        return False


def _trim_heap() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _bench_data():
    from .data import load

    return load("mnist5k").subset(4000, 1000, seed=0)


def sweep_times(n_models: int = 32, models=("softmax_regression", "mlp"), epochs: int = 10, batch_size: int = 64,
                workers: int = 2, progress: bool = False) -> list[dict]:
    """Side by side on this machine: one retraining sweep (``n_models`` runs from scratch on random 3/4 subsets of
    4,000 MNIST images, SGD; jobs described by data, :func:`mpe.retrain.fit_subset`) run one after another,
    vectorised (:func:`mpe.retrain.fit_subsets`: :func:`mpe.train.train_many`) and on a Dask ``LocalCluster`` of
    ``workers`` single-threaded processes, each training its share of the runs vectorised (if the distributed extra
    is installed); then the cost of per-example gradients (``torch.func``: vmap of grad) in batched backward passes.
    One row per measurement. Nothing is cached: every sweep trains."""
    from .data import from_spec
    from .retrain import fit_subset, fit_subsets, run_specs

    data = _bench_data()
    from_spec(data.spec)  # the jobs' data, loaded once before the clocks start
    recipe = dict(epochs=epochs, lr=0.05, batch_size=batch_size, schedule="constant")
    rows = []
    for name in models:
        specs = [dict(data=data.spec, model=dict(name=name), seed=m, evaluate="test_accuracy", train=recipe,
                      kept=torch.randperm(4000, generator=torch.Generator().manual_seed(m))[:3000].tolist())
                 for m in range(n_models)]
        seq = _timed(lambda: [fit_subsets([spec], vectorise=False) for spec in specs])
        # torch.func compiles its vmapped program once per process (~2 s): a two-model, one-epoch run pays it before
        # the clock starts, as a long sweep pays it once
        fit_subsets([dict(spec, train=dict(recipe, epochs=1)) for spec in specs[:2]], vectorise=True)
        vec = _timed(lambda: fit_subsets(specs, vectorise=True))
        rows.append(dict(measure=f"{n_models} x {name}: vectorised vs one after another", baseline_s=seq,
                         new_s=vec, speedup=seq / vec))
        try:
            import distributed
        except ImportError:
            continue
        with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, dashboard_address=None) as cluster, \
                distributed.Client(cluster) as client:
            warm = [dict(spec, train=dict(recipe, epochs=1)) for spec in specs[:2]]
            client.run(fit_subset.batched, warm)  # on every worker: data loaded, vmap compiled
            # run_specs cuts the sweep into one share per worker, each trained as one vectorised program
            fan = _timed(lambda: run_specs(fit_subset, specs, None, executor=client, progress=progress))
        rows.append(dict(measure=f"{n_models} x {name}: Dask, {workers} single-thread workers, each vectorised, vs one "
                                 f"after another ({torch.get_num_threads()} threads)", baseline_s=seq, new_s=fan,
                         speedup=seq / fan))
    from torch.func import functional_call, grad, vmap

    from .curvature import per_example_grads

    x, y = data.x_train[:1000], data.y_train[:1000]
    for name in ("mlp", "lenet5"):
        net = get_model(name, data.shape, 10, seed=0)
        params = dict(net.named_parameters())

        def loss(p, xi, yi, net=net):
            return torch.nn.functional.cross_entropy(functional_call(net, p, (xi[None],)), yi[None])

        def batched(net=net):
            net.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()

        per_example = vmap(grad(loss), in_dims=(None, 0, 0))
        routes = {"torch.func (vmap of grad)": lambda: per_example(params, x, y),
                  "mpe.curvature.per_example_grads (layer route)": lambda net=net: per_example_grads(net, x, y),
                  # the physical limit of any route: writing the (N, P) result once
                  "writing the (N, P) result alone": lambda: torch.empty(len(x), n_params(net)).fill_(1.0)}
        batched()
        t_batch = min(_timed(batched) for _ in range(3))
        for route, fn in routes.items():
            fn()
            t = min(_timed(fn) for _ in range(3))
            rows.append(dict(measure=f"per-example gradients of 1,000 examples, {name}: {route}, vs one batched "
                                     "backward", baseline_s=t_batch, new_s=t, speedup=t_batch / t))
    rows += mpe_times(data)
    return rows


def mpe_times(data, n: int = 4000, batch_size: int = 128) -> list[dict]:
    """The MPE of all N examples (a Laplace posterior fitted on the N examples, then every V_i = J_i S⁻¹ J_iᵀ) against
    one training epoch on them, for the MLP and LeNet-5 and the diagonal and K-FAC posteriors (issue target: at most
    one epoch for LeNet-5). ``speedup`` < 1 means the MPE costs more than an epoch: 1 / speedup epochs."""
    from .curvature import _layer_io, laplace_posterior, predictive_covariance

    x, y = data.x_train[:n], data.y_train[:n]
    rows = []
    for name in ("mlp", "lenet5"):
        net = get_model(name, data.shape, 10, seed=0)
        train(net, x[:2 * batch_size], y[:2 * batch_size], epochs=1, lr=0.01, batch_size=batch_size)  # warm-up
        epoch = _timed(lambda: train(net, x, y, epochs=1, lr=0.01, batch_size=batch_size))
        # the floor of any exact route: every class's output gradient at every layer, i.e. a forward and K backward
        # passes over the N examples, once for the posterior's curvature and once for the V_i
        floor = 2 * _timed(lambda: [None for _ in _layer_io(net, x, 256, inputs=lambda m, inp: inp)])
        rows.append(dict(measure=f"floor of the MPE of all {n:,} examples, {name}: a forward and K backward passes, "
                                 "twice, vs one epoch", baseline_s=epoch, new_s=floor, speedup=epoch / floor))
        for kind in ("diag", "kfac"):
            t = _timed(lambda: predictive_covariance(net, x, laplace_posterior(kind, net, x, 1.0)))
            rows.append(dict(measure=f"MPE of all {n:,} examples, {name}, {kind} posterior, vs one epoch",
                             baseline_s=epoch, new_s=t, speedup=epoch / t))
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
    w = sub.add_parser("sweeps", help="a retraining sweep vectorised, on Dask and one after another; per-example "
                                      "gradients against a batched backward pass (make bench)")
    w.add_argument("--models", type=int, default=32, help="runs in the sweep")
    w.add_argument("--epochs", type=int, default=10)
    w.add_argument("--workers", type=int, default=2, help="Dask LocalCluster worker processes")
    a = ap.parse_args(argv)
    import pandas as pd

    from . import get_device

    if a.cmd == "sweeps":
        table = pd.DataFrame(sweep_times(a.models, epochs=a.epochs, workers=a.workers, progress=True))
        print(table.to_markdown(index=False, floatfmt=".3g"))
        return 0
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
