"""Ground truth by retraining, as a list of independent jobs with cached results.

Each job has a key (a short hash of its JSON description and of the code that computes it); its result is written
atomically to ``<cache>/<key>.pt`` when it finishes. Running the same sweep again loads finished jobs and computes
only the missing ones, so an interrupted sweep resumes where it stopped. Jobs run in this process (default) or on the
workers of a Dask cluster (``executor=``, or the scheduler address in ``$MPE_DASK_SCHEDULER``): a
``distributed.LocalCluster`` with one worker per core or GPU, or a SLURM cluster from dask-jobqueue. Sweeps of
small models trained from scratch (:func:`subset_fits`) train many models in one vectorised program
(:func:`mpe.train.train_many`).
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import uuid
from pathlib import Path

import torch

from .train import flat_params, predict, set_flat_params, train, train_many, vectorisable

__all__ = ["job_key", "tensor_digest", "run_jobs", "removal_jobs", "retrained_outputs", "default_cache", "subset_runs",
           "subset_fits", "vectorise_pays", "save_result", "load_cached", "JobsFailed"]


def default_cache(name: str) -> Path:
    """``$MPE_RESULTS_DIR/<name>`` (default ``build/cache/<name>`` under the working directory's repository)."""
    root = os.environ.get("MPE_RESULTS_DIR")
    if root is None:
        from .harness import repo_root

        root = repo_root() / "build" / "cache"
    return Path(root) / name


CHUNK = 32  # models trained at once by the vectorised sweeps (memory: M copies of the model and its optimiser)
PRESENTATION = ("harness.py", "plots.py", "stats.py", "cost.py", "workload.py")  # they never compute a job's result


def code_fingerprint() -> str:
    """Hash of the package's source files that compute results: part of every job key, so results cached by older
    code are never reused. The presentation and costing modules (:data:`PRESENTATION`) are left out: a new claims
    format, plot style or cost formula does not retrain anything."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        if f.name not in PRESENTATION:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


_SPECS: dict = {}  # key -> the description it was made from, to name a failed job


def job_key(**spec) -> str:
    """Stable 16-hex-digit key of a JSON-serialisable job description, of the code that runs it and of the torch
    version (whose kernels round differently from one version to the next)."""
    blob = json.dumps(dict(spec, _code=code_fingerprint(), _torch=torch.__version__), sort_keys=True,
                      default=str).encode()
    key = hashlib.sha256(blob).hexdigest()[:16]
    _SPECS[key] = spec
    return key


def tensor_digest(t: torch.Tensor) -> str:
    """Short hash of a tensor's values, dtype and shape (for cache keys)."""
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.numpy().tobytes()).hexdigest()[:16]


def save_result(path: Path, result) -> None:
    """Write ``result`` to ``path`` atomically: through a temporary file of this writer's own (process id and a
    random suffix), then one rename. Readers see the old file or the whole new one; two writers of one key never
    mix their bytes, the last rename wins."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(result, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_cached(keys, cache: Path | None) -> tuple[dict, dict]:
    """The results of ``keys`` already in ``cache`` ({key: result}) and the cache path of each missing key
    ({key: path, or None without a cache}), in the order of ``keys`` (repeated keys once). Creates ``cache``."""
    results, missing = {}, {}
    if cache is not None:
        cache = Path(cache)
        cache.mkdir(parents=True, exist_ok=True)
    for key in keys:
        path = cache / f"{key}.pt" if cache is not None else None
        if path is not None and path.exists():
            results[key] = torch.load(path, weights_only=False)
        else:
            missing[key] = path
    return results, missing


class JobsFailed(RuntimeError):
    """Some jobs of a sweep raised; the others' results are cached. ``failed`` maps key -> (spec, exception)."""

    def __init__(self, failed: dict, done: int):
        self.failed = failed
        lines = [f"  {k}: {type(e).__name__}: {e} (spec {spec})" for k, (spec, e) in list(failed.items())[:10]]
        more = f"\n  ... and {len(failed) - 10} more" if len(failed) > 10 else ""
        super().__init__(f"{len(failed)} job(s) failed, {done} finished and cached:\n" + "\n".join(lines) + more)


_CLIENTS: dict = {}  # one client per scheduler address or cluster, reused by every sweep of the process


def _client(executor):
    """A ``distributed.Client`` from ``executor`` (a Client, a cluster, or a scheduler address), or None."""
    if executor is None:
        executor = os.environ.get("MPE_DASK_SCHEDULER") or None
    if executor is None or executor == "local":
        return None
    try:
        from distributed import Client
    except ImportError as e:
        raise ImportError("a Dask executor needs the distributed extra: pip install -e '.[distributed]'") from e
    if isinstance(executor, Client):
        return executor
    key = executor if isinstance(executor, str) else id(executor)
    if key not in _CLIENTS or _CLIENTS[key].status in ("closing", "closed"):
        _CLIENTS[key] = Client(executor)
    return _CLIENTS[key]


def run_jobs(jobs: dict, cache: Path | None = None, progress: bool = True, desc: str = "jobs", executor=None) -> dict:
    """Run ``jobs`` {key: zero-argument callable}, caching each result as ``cache/<key>.pt``; returns {key: result}.

    ``executor``: None or "local" runs the jobs here, one after another (unless ``$MPE_DASK_SCHEDULER`` names a
    Dask scheduler); a ``distributed.Client``, a cluster or a scheduler address runs them on its workers (the
    callables travel by cloudpickle; results come back and are cached here as they finish). One progress bar counts
    finished jobs. A job that raises does not stop the others: they finish and are cached, then :class:`JobsFailed`
    names every failed key with its description.
    """
    results, paths = load_cached(jobs, cache)
    todo = [(key, jobs[key], path) for key, path in paths.items()]
    if not todo:
        return results
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"{desc} ({len(results)} cached)")
    failed = {}

    def finish(key, path, res):
        if path is not None:
            save_result(path, res)
        results[key] = res
        if bar is not None:
            bar.update()

    client = _client(executor)
    if client is None:
        for key, fn, path in todo:
            try:
                res = fn()
            except Exception as e:  # noqa: BLE001 - reported with the job's description below
                failed[key] = (_SPECS.get(key), e)
                continue
            finish(key, path, res)
    else:
        from distributed import as_completed

        futures = {client.submit(fn, pure=False, key=f"{desc}-{key}-{uuid.uuid4().hex[:6]}"): (key, path)
                   for key, fn, path in todo}
        for fut in as_completed(futures):
            key, path = futures[fut]
            if fut.status == "error":
                failed[key] = (_SPECS.get(key), fut.exception())
            else:
                finish(key, path, fut.result())
            fut.release()
    if bar is not None:
        bar.close()
    if failed:
        raise JobsFailed(failed, len(results))
    return results


def _kept(n: int, group) -> torch.Tensor:
    """Indices of 0..n-1 without those in ``group``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(group)] = False
    return torch.nonzero(keep).flatten()


def removal_jobs(model, x, y, removed: list, probe: torch.Tensor, train_kw: dict, tag: dict) -> dict:
    """Jobs that warm-start from the model's current parameters θ_* and retrain without each group in ``removed``.

    ``removed`` is a list of index lists; each job returns the softmax outputs on ``probe`` (M, ...) after
    retraining, as a tensor (M, K). ``tag`` (data, model and θ_* identity) enters the cache key together with
    ``train_kw``, the group and digests of θ_*, the data and the probe, so a changed setting never reuses a stale
    result.
    """
    theta = flat_params(model).clone()
    n = len(x)

    def make(group):
        def job():
            set_flat_params(model, theta)
            keep = _kept(n, group)
            train(model, x[keep], y[keep], **train_kw)
            out = torch.softmax(predict(model, probe), 1).cpu()
            set_flat_params(model, theta)
            return out
        return job

    digests = dict(theta=tensor_digest(theta), data=tensor_digest(x) + tensor_digest(y), probe=tensor_digest(probe))
    device = theta.device.type
    return {job_key(group=list(map(int, g)), train=train_kw, device=device, **digests, **tag): make(g) for g in removed}


def _fit_chunks(todo: list, make_model, x, y, kw: dict, evaluate, results: dict, bar, *, chunk: int, vectorised,
                callbacks=None) -> None:
    """Train and evaluate the runs ``todo`` [(key, kept indices, seed, cache path or None)], ``chunk`` at a time:
    ``make_model(seed)`` builds each model; a chunk is trained by :func:`mpe.train.train_many` where
    ``vectorised(first model)`` says so, else one ``train`` per run; then ``results[key] = evaluate(model,
    callbacks)``, saved where a path is given, and ``bar`` (tqdm) moves on. ``callbacks()`` returns new callback
    objects for one run."""
    for i in range(0, len(todo), chunk):
        part = todo[i:i + chunk]
        models = [make_model(seed) for _, _, seed, _ in part]
        cbs = [list(callbacks()) if callbacks is not None else [] for _ in part]
        if vectorised(models[0]):
            train_many(models, x, y, [idx for _, idx, _, _ in part], [seed for _, _, seed, _ in part], callbacks=cbs,
                       **kw)
        else:
            for (_, idx, seed, _), model, cb in zip(part, models, cbs):
                train(model, x[idx], y[idx], seed=seed, callbacks=cb, **kw)
        for (key, _, _, path), model, cb in zip(part, models, cbs):
            results[key] = evaluate(model, cb)
            if path is not None:
                save_result(path, results[key])
        bar.update(len(part))


def retrained_outputs(model, x, y, groups, probe: torch.Tensor, train_kw: dict, tag: dict, cache=None,
                      desc: str = "retrain", vectorise="auto", chunk: int = CHUNK):
    """Softmax outputs on ``probe`` after warm-started retraining without each group, and for a reference run.

    The reference is the same protocol on all the data, so comparing with it cancels any drift of an imperfectly
    converged θ_*. Returns (reference (M, K), [outputs (M, K) per group]); every run is a cached job. Minibatch
    recipes that :func:`mpe.train.train_many` can vectorise run up to ``chunk`` retrains at a time where it pays
    (``vectorise="auto"``, :func:`vectorise_pays`; equal to the one-by-one jobs to float rounding, same cache keys).
    """
    removed = [[]] + [list(g) for g in groups]
    jobs = removal_jobs(model, x, y, removed, probe, train_kw, tag)
    kw = {k: v for k, v in train_kw.items() if k != "seed"}
    fast = vectorisable(model, **kw) is None and (
        vectorise == "auto" and vectorise_pays(model, x[:1], kw.get("batch_size", 256), len(x)) or vectorise is True)
    if not fast:
        res = run_jobs(jobs, cache, desc=desc)
    else:
        res, paths = load_cached(jobs, cache)
        todo = [(key, _kept(len(x), group), train_kw.get("seed", 0), paths[key])
                for key, group in zip(jobs, removed) if key in paths]
        theta = flat_params(model).clone()

        def warm_copy(seed):
            m = copy.deepcopy(model)
            set_flat_params(m, theta)
            return m

        from tqdm.auto import tqdm

        with tqdm(total=len(todo), desc=f"{desc} ({len(res)} cached, vectorised)", disable=not todo) as bar:
            _fit_chunks(todo, warm_copy, x, y, kw, lambda m, cb: torch.softmax(predict(m, probe), 1).cpu(), res,
                        bar, chunk=chunk, vectorised=lambda m: True)
    outs = [res[k] for k in jobs]
    return outs[0], outs[1:]


def subset_runs(fit, subsets: list, tag: dict, cache=None, desc: str = "retrain", executor=None,
                progress: bool = True) -> list:
    """Train from scratch on each kept subset: ``subsets`` is [(kept indices, seed)] and ``fit(kept, seed)`` returns
    the result (e.g. the test accuracy). Each run is a cached job keyed by ``tag`` (data, model and every training
    setting; the device type too where runs leave the CPU, as their rounding differs), the seed and a digest of the
    kept indices; identical runs are computed once. See :func:`subset_fits` for the vectorised form of the common
    case."""
    keys = _subset_keys(subsets, tag)
    jobs = {k: (lambda idx=idx, seed=seed: fit(idx, seed)) for k, (idx, seed) in zip(keys, subsets)}
    res = run_jobs(jobs, cache, progress=progress, desc=desc, executor=executor)
    return [res[k] for k in keys]


def _subset_keys(subsets, tag):
    return [job_key(kept=tensor_digest(torch.as_tensor(idx)), seed=int(seed), **tag) for idx, seed in subsets]


CPU_VECTORISE_FLOPS = 2.5e7


def vectorise_pays(model, x1: torch.Tensor, batch_size: int | None, n: int) -> bool:
    """Whether training many copies of ``model`` in one vmapped program beats training them one after another.

    On a GPU it does: one step of M small models costs about as much as one step of one. On a CPU the vmapped
    program saves the per-step overhead but runs its matrix products as batched products, which PyTorch's CPU
    kernels do about 2x slower for large matrices; it pays only while one model's step is small. Measured on this
    project's 2-core CPU (forward FLOPs per model and step -> vectorised speed-up): MLP(32,16) at batch 64,
    3.3M -> 2.1x; the lpNTK CNN at batch 10, 22M -> 1.6x; at batch 40, 87M -> 0.7x; Jiang's MLP at batch 64,
    68M -> 0.5x. Hence the rule: vectorise on a CPU when the forward FLOPs of one model's minibatch are at most
    :data:`CPU_VECTORISE_FLOPS`. ``x1`` is one input example (1, ...); ``n`` the subset size."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return True
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x1.to(device))
    return counter.get_total_flops() * min(batch_size or n, n) <= CPU_VECTORISE_FLOPS


def subset_fits(make_model, x, y, subsets: list, train_kw, evaluate, tag: dict, cache=None, callbacks=None,
                vectorise="auto", chunk: int = CHUNK, desc: str = "retrain", progress: bool = True) -> list:
    """``subset_runs`` for the common case, vectorised: train ``make_model(seed)`` from scratch on each
    ``(kept indices, seed)`` of ``subsets`` with :func:`mpe.train.train` keywords ``train_kw`` (a dict, or a
    function of the subset size that returns one, e.g. for a per-example weight decay), and return
    ``evaluate(model)`` of each. With ``callbacks(n_kept) -> [callback, ...]`` (new objects for each run, e.g. a
    :class:`mpe.regularity.VisitRecorder`), every run gets its own and the result is ``evaluate(model, callbacks)``.
    The runs not yet cached are trained up to ``chunk`` at a time by
    :func:`mpe.train.train_many` (equal to one ``train`` per run, to float rounding), or one after another where the
    model or recipe cannot be vectorised (BatchNorm, dropout, IVON, L-BFGS) or ``vectorise`` is False; "auto"
    vectorises where it pays (:func:`vectorise_pays`). Results are cached under the same keys as :func:`subset_runs`,
    one file per run, so an interrupted sweep resumes."""
    recipe = train_kw if callable(train_kw) else (lambda n: train_kw)
    keys = _subset_keys(subsets, tag)
    results, paths = load_cached(keys, cache)
    spec = dict(zip(keys, subsets))
    groups = {}  # kept size -> runs to train [(key, kept, seed, path)]: the recipe may depend on the size
    for key, path in paths.items():
        idx, seed = torch.as_tensor(spec[key][0]).long(), int(spec[key][1])
        groups.setdefault(len(idx), []).append((key, idx, seed, path))
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), desc=f"{desc} ({len(results)} cached)", disable=not (progress and paths)) as bar:
        for size, todo in groups.items():
            kw = recipe(size)

            def fast(model, kw=kw, size=size):
                pays = vectorise_pays(model, x[:1], kw.get("batch_size", 256), size) if vectorise == "auto" \
                    else bool(vectorise)
                return pays and vectorisable(model, **kw) is None

            _fit_chunks(todo, make_model, x, y, kw, evaluate if callbacks is not None else lambda m, cb: evaluate(m),
                        results, bar, chunk=chunk, vectorised=fast,
                        callbacks=None if callbacks is None else lambda size=size: callbacks(size))
    return [results[k] for k in keys]
