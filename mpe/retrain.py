"""Ground truth by retraining, as a list of independent jobs with cached results.

A job is data: a top-level function and a JSON description (its *spec*) from which a worker rebuilds everything: the
data set, the model, the subset and the training recipe (:func:`fit_subset`, run by :func:`run_specs`). Its key
hashes the spec, the torch version, the device type and only the code the job runs (:func:`code_fingerprint`: the
function's module and the package modules it imports). Its result is written atomically to ``<cache>/<key>.pt``
when it finishes, so running the same sweep again loads finished jobs and computes only the missing ones: an
interrupted sweep resumes where it stopped. Processes that share a cache train a job once: one claims it, the others
wait for its result (:func:`_claim`). Jobs run in this process (default) or on the workers of a Dask cluster
(``executor=``, or the scheduler address in ``$MPE_DASK_SCHEDULER``): a ``distributed.LocalCluster`` with one
worker per core or GPU, or a SLURM cluster from dask-jobqueue. Specs that differ only in subset and seed are trained
together, many models in one vectorised program (:func:`mpe.train.train_many`), locally or on a worker.

Sweeps whose jobs need objects no spec can name (a trained θ_* to warm-start from, a penalty) still pass
zero-argument callables to :func:`run_jobs`; their key includes a fingerprint of the whole package.
"""
from __future__ import annotations

import ast
import contextlib
import copy
import functools
import hashlib
import importlib
import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

import torch

from .train import (IN_JOB, LearningDifficulty, VisitRecorder, flat_params, nll_and_error, predict, train,
                    train_many, vectorisable)

__all__ = ["job_key", "tensor_digest", "run_jobs", "check_spec", "stash", "unstash", "warm_retrain", "retrained_outputs",
           "default_cache", "subset_runs", "subset_fits", "vectorise_pays", "save_result", "load_result", "load_cached",
           "JobsFailed", "run_specs", "spec_key", "fit_subset", "fit_subsets", "code_fingerprint", "code_closure", "EVALUATIONS"]


def default_cache(name: str) -> Path:
    """``$MPE_RESULTS_DIR/<name>`` (default ``build/cache/<name>`` under the working directory's repository)."""
    root = os.environ.get("MPE_RESULTS_DIR")
    if root is None:
        from .harness import repo_root

        root = repo_root() / "build" / "cache"
    return Path(root) / name


CHUNK = 32  # models trained at once by the vectorised sweeps (memory: M copies of the model and its optimiser)
PRESENTATION = ("harness.py", "plots.py", "stats.py", "cost.py", "workload.py")  # they never compute a job's result


PACKAGE = Path(__file__).parent


def _imports(path: Path, package: str) -> set[str]:
    """Stems of the sibling modules that the source file ``path`` imports (``from .x``, ``from . import x``,
    ``from <package>.x``, ``import <package>.x``), at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            parts = (node.module or "").split(".")
            if node.level == 1 or (node.level == 0 and parts[0] == package):
                rest = parts if node.level == 1 else parts[1:]
                out.update([rest[0]] if rest and rest[0] else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[1] for a in node.names if a.name.startswith(package + "."))
    return out


def code_closure(module: str, root: Path = PACKAGE) -> list[str]:
    """The package modules (file stems under ``root``) that module ``module`` reaches through its imports,
    transitively, with the package's ``__init__``; the presentation modules (:data:`PRESENTATION`) left out."""
    seen, todo = set(), [module, "__init__"]
    while todo:
        m = todo.pop()
        path = root / f"{m}.py"
        if m in seen or not path.exists() or path.name in PRESENTATION:
            continue
        seen.add(m)
        todo.extend(_imports(path, root.name))
    return sorted(seen)


def code_fingerprint(fn=None, root: Path = PACKAGE) -> str:
    """Hash of the source that computes a result, part of every job key, so results cached by older code are never
    reused. For a job function ``fn``: its module and the package modules it reaches (:func:`code_closure`), so an
    edit elsewhere in the package keeps its cache. Without ``fn`` (a closure, whose code cannot be known): every
    module but the presentation and costing ones (:data:`PRESENTATION`: a new claims format, plot style or cost
    formula retrains nothing)."""
    if fn is None:
        files = [f for f in sorted(root.glob("*.py")) if f.name not in PRESENTATION]
    elif fn.__module__.startswith(root.name + "."):
        files = [root / f"{m}.py" for m in code_closure(fn.__module__.split(".")[1], root)]
    else:  # a job function of the user's own module: that file and the package modules it imports
        own = Path(importlib.import_module(fn.__module__).__file__)
        files = [own] + [root / f"{m}.py" for m in sorted({c for m in _imports(own, root.name)
                                                             for c in code_closure(m, root)})]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + f.read_bytes())
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


def load_result(path: Path):
    """The result :func:`save_result` wrote to ``path``: any object a job returns, so not a weights-only load."""
    return torch.load(path, weights_only=False)


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
            results[key] = load_result(path)
        else:
            missing[key] = path
    return results, missing


def _short(spec, limit: int = 400) -> str:
    """A job's description for an error message, cut to ``limit`` characters (a spec may list thousands of indices)."""
    text = repr(spec)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


class JobsFailed(RuntimeError):
    """Some jobs of a sweep raised; the others' results are cached. ``failed`` maps key -> (spec, exception)."""

    def __init__(self, failed: dict, done: int):
        self.failed = failed
        lines = [f"  {k}: {type(e).__name__}: {e} (spec {_short(spec)})" for k, (spec, e) in list(failed.items())[:10]]
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


def _slots(executor) -> int:
    """How many units of a sweep run at once: 1 here; on a Dask cluster, its workers' threads now (Dask runs one
    task per thread: one per worker with one thread per GPU or core, as the README's clusters are set up). A cluster
    that has no workers yet (a SLURM cluster whose jobs are queued) counts as 1: its sweeps are cut by ``chunk``
    alone."""
    client = _client(executor)
    return 1 if client is None else max(1, sum(client.nthreads().values()))


def run_jobs(jobs: dict, cache: Path | None = None, progress: bool = True, desc: str = "jobs", executor=None) -> dict:
    """Run ``jobs`` {key: zero-argument callable}, caching each result as ``cache/<key>.pt``; returns {key: result} in
    the order of ``jobs``.

    ``executor``: None or "local" runs the jobs here, one after another (unless ``$MPE_DASK_SCHEDULER`` names a
    Dask scheduler); a ``distributed.Client``, a cluster or a scheduler address runs them on its workers (the
    callables travel by cloudpickle; results come back and are cached here as they finish). One progress bar counts
    finished jobs. A job that raises does not stop the others: they finish and are cached, then :class:`JobsFailed`
    names every failed key with its description. Prefer :func:`run_specs` where the job can be described as data.
    """
    results, paths = load_cached(jobs, cache)
    units = [([key], _one, (jobs[key],)) for key in paths]
    _execute(units, paths, results, _SPECS, progress, desc, executor)
    return {key: results[key] for key in jobs}  # not in the order they finished in


def _one(fn):
    return [fn()]


def _execute(units: list, paths: dict, results: dict, specs: dict, progress: bool, desc: str, executor) -> None:
    """Run ``units`` [(keys, function, args)], each returning the results of its keys as a list, here or on a Dask
    cluster; store each result in ``results`` and at ``paths[key]`` (if not None) as its unit finishes; one progress
    bar over jobs; :class:`JobsFailed` at the end names the keys of the units that raised, with ``specs[key]``.

    Processes that share a cache (two notebooks under ``make -j`` that need the same runs, on one machine or on a
    cluster's shared file system) train each job once, and share the work: before a unit runs, this process claims
    each of its cached keys (:func:`_claim`). A unit another process has claimed is left to it; once its claims are
    gone, its results are read from the cache, or trained here where that process did not finish them (it failed,
    or died: a claim of a dead process is void)."""
    if not units:
        return
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(keys) for keys, *_ in units), desc=f"{desc} ({len(results)} cached)")
    failed, held = {}, set()

    def finish(keys, out, error=None, cached=False):
        for i, key in enumerate(keys):
            if error is not None:
                failed[key] = (specs.get(key), error)
            else:
                if paths[key] is not None and not cached:
                    save_result(paths[key], out[i])
                results[key] = out[i]
            if key in held:
                held.discard(key)
                _unclaim(paths[key])
        if bar is not None:
            bar.update(len(keys))

    def finished_elsewhere(keys) -> bool:  # every result is in the cache already: read it
        if not all(paths[k] is not None and paths[k].exists() for k in keys):
            return False
        finish(keys, [load_result(paths[k]) for k in keys], cached=True)
        return True

    def claim(keys) -> bool:  # all of a unit's cached keys, or none
        for key in keys:
            if paths[key] is not None:
                if not _claim(paths[key]):
                    for k in keys:
                        if k in held:
                            held.discard(k)
                            _unclaim(paths[k])
                    return False
                held.add(key)
        return True

    client = _client(executor)

    def run(todo):
        if client is None:
            for keys, fn, args in todo:
                try:
                    out = _as_job(fn, *args)
                except Exception as e:  # noqa: BLE001 - reported with the jobs' descriptions below
                    finish(keys, None, e)
                    continue
                finish(keys, out)
            return
        from distributed import as_completed

        futures = {client.submit(_on_worker, fn, *args, pure=False, key=f"{desc}-{keys[0]}-{uuid.uuid4().hex[:6]}"):
                   keys for keys, fn, args in todo}
        for fut in as_completed(futures):
            if fut.status == "error":
                finish(futures[fut], None, fut.exception())
            else:
                finish(futures[fut], fut.result())
            fut.release()

    try:
        mine, theirs = [], []
        for unit in units:  # here, each unit is claimed as it comes up, so that two processes share a sweep's units
            if not claim(unit[0]):
                theirs.append(unit)
            elif not finished_elsewhere(unit[0]):
                run([unit]) if client is None else mine.append(unit)
        run(mine)  # on Dask, every unit this process claimed, at once
        if theirs and bar is not None:
            bar.set_postfix_str(f"waiting for another process's {sum(len(u[0]) for u in theirs)}")
        while theirs:  # wait for the other process, then read what it cached, or take over what it left
            time.sleep(CLAIM_POLL_S)
            waiting = []
            for unit in theirs:
                if finished_elsewhere(unit[0]):
                    continue
                if claim(unit[0]):
                    run([unit])
                else:
                    waiting.append(unit)
            theirs = waiting
    finally:
        for key in held:
            _unclaim(paths[key])
        if bar is not None:
            bar.close()
    if failed:
        raise JobsFailed(failed, len(results))


CLAIM_POLL_S = 1.0  # how often a sweep looks whether the jobs another process claimed are done
CLAIM_STALE_S = 600.0  # a claim from another machine not refreshed for this long is void: its process is gone
_HEARTBEAT_S = 60.0  # how often a process refreshes the claims it holds
_HELD: set = set()  # the claim files this process holds
_HOST = socket.gethostname()


def _claim_file(path: Path) -> Path:
    return path.with_name(path.name + ".claim")


def _claim(path: Path) -> bool:
    """Claim the job whose result goes to ``path``: create ``<path>.claim`` (this machine's name and process id)
    unless another process holds it. A claim is void once its process is gone: on this machine, where no process
    has its id; from another machine, where it has not been refreshed for :data:`CLAIM_STALE_S` (a holder refreshes
    its claims every minute). Where two processes void one claim at once, a job may be trained twice, and its result
    is still whole (:func:`save_result`). Claims are plain files, not held locks, so that a sweep of thousands of
    jobs holds no file descriptors."""
    file = _claim_file(path)
    for _ in range(2):
        try:
            fd = os.open(file, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if not _void(file):
                return False
            file.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(f"{_HOST} {os.getpid()}")
        _HELD.add(file)
        _heartbeat()
        return True
    return False


def _void(file: Path) -> bool:
    """Whether the claim ``file`` no longer stands for a live process (see :func:`_claim`)."""
    import psutil

    try:
        text, age = file.read_text(), time.time() - file.stat().st_mtime
    except FileNotFoundError:
        return True
    host, _, pid = text.partition(" ")
    if host == _HOST and pid.isdigit():
        if int(pid) == os.getpid():  # ours, and not held: left by an interrupted sweep of this process
            return file not in _HELD
        return not psutil.pid_exists(int(pid))
    return age > CLAIM_STALE_S


def _unclaim(path: Path) -> None:
    """Give up the claim of ``path``'s job (where it is still this process's)."""
    file = _claim_file(path)
    _HELD.discard(file)
    with contextlib.suppress(OSError):
        if file.read_text() == f"{_HOST} {os.getpid()}":
            file.unlink()


@functools.cache
def _heartbeat() -> None:
    """Start, once per process, the thread that refreshes the claims this process holds every minute."""
    def beat():
        while True:
            time.sleep(_HEARTBEAT_S)
            for file in list(_HELD):
                with contextlib.suppress(OSError):
                    os.utime(file)

    threading.Thread(target=beat, daemon=True, name="mpe-claims").start()


if hasattr(os, "register_at_fork"):  # a forked child holds none of its parent's claims, nor its heartbeat thread
    os.register_at_fork(after_in_child=lambda: (_HELD.clear(), _heartbeat.cache_clear()))


MMAP_THRESHOLD = 32 << 20  # glibc's own ceiling for its dynamic mmap threshold on 64-bit Linux (DEFAULT_MMAP_THRESHOLD_MAX)


def _on_worker(fn, *args):
    """``fn(*args)`` on a Dask worker, after :func:`_restore_mmap_threshold` and :func:`_check_one_gpu`."""
    _restore_mmap_threshold()
    _check_one_gpu()
    return _as_job(fn, *args)


def _as_job(fn, *args):
    """``fn(*args)`` with :data:`mpe.train.IN_JOB` set: the runs it trains are logged as a sweep's jobs."""
    token = IN_JOB.set(True)
    try:
        return fn(*args)
    finally:
        IN_JOB.reset(token)


@functools.cache
def _check_one_gpu() -> None:
    """Warn, once per worker process, where a worker sees several GPUs: torch then trains every job on cuda:0, and so
    does every other worker of that machine, one GPU doing the work of all. One worker per GPU needs each worker to
    see its own: dask-cuda's ``LocalCUDACluster`` or ``dask cuda worker`` set ``CUDA_VISIBLE_DEVICES`` so."""
    if torch.cuda.device_count() > 1:
        import warnings

        warnings.warn(f"this Dask worker sees {torch.cuda.device_count()} GPUs and trains on cuda:0 only, as does "
                      "every other worker on its machine: start one worker per GPU with dask-cuda (LocalCUDACluster, "
                      "or `dask cuda worker`), or give each worker its own CUDA_VISIBLE_DEVICES", stacklevel=2)


@functools.cache
def _restore_mmap_threshold() -> bool:
    """Undo, once per process, what Dask's worker environment costs a torch training loop on Linux. The nanny starts
    each worker with ``MALLOC_TRIM_THRESHOLD_`` set (Dask's ``distributed.nanny.pre-spawn-environ``), and setting any
    malloc threshold turns off glibc's dynamic mmap threshold: every tensor above 128 KiB (a vectorised minibatch, its
    activations) is then a fresh ``mmap`` whose pages fault in at each step. Measured on the 2-core machine: 16 MLPs
    trained vectorised in one single-thread process, 1.4 s; with Dask's setting, 2.3 s. Setting the mmap threshold to
    glibc's own dynamic ceiling (32 MiB) restores 1.4 s. Done only where the trim threshold is set and the mmap
    threshold is not (a user's explicit ``MALLOC_MMAP_THRESHOLD_`` wins), and only with glibc; returns whether it was
    done."""
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, MMAP_THRESHOLD))  # -3: M_MMAP_THRESHOLD in malloc.h; mallopt returns 1 on success
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to undo
        return False


# ----------------------------------------------------------------------------------------------------------
# Jobs as data: a top-level function and a JSON spec
# ----------------------------------------------------------------------------------------------------------
def check_spec(spec: dict, keys, job: str) -> None:
    """Raise ValueError, naming the missing and the unknown keys, unless the spec of ``job`` has exactly ``keys``."""
    missing, unknown = set(keys) - set(spec), set(spec) - set(keys)
    if missing or unknown:
        raise ValueError(f"a {job} spec needs exactly {', '.join(keys)} (missing {sorted(missing)}, unknown "
                         f"{sorted(unknown)})")


def job_function(fn) -> str:
    """``"module:name"`` of ``fn``, which must be a top-level function of an importable module (not ``__main__``,
    not a lambda or a closure): a worker finds it by that name and rebuilds everything else from the spec."""
    name, module = getattr(fn, "__qualname__", ""), getattr(fn, "__module__", None)
    ok = module not in (None, "__main__") and "." not in name and "<" not in name
    if ok:
        try:
            ok = getattr(importlib.import_module(module), name, None) is fn
        except ImportError:
            ok = False
    if not ok:
        raise ValueError(f"a job must be a top-level function of an importable module, not {fn!r} (put it in a "
                         "module, and everything it needs in its spec)")
    return f"{module}:{name}"


def spec_key(fn, spec: dict, code: str | None = None) -> str:
    """Stable 16-hex-digit key of the job ``fn(spec)``: the function's name, the spec (JSON; a ``"device"`` entry,
    default "cpu", enters as its device type), the torch version and :func:`code_fingerprint` of ``fn`` (``code``:
    that fingerprint, computed once for a sweep's many keys; it parses the package's source, ~0.05 s a call)."""
    name = job_function(fn)
    try:
        blob = json.dumps(dict(fn=name, spec=spec, torch=torch.__version__, code=code or code_fingerprint(fn),
                               device=torch.device(spec.get("device", "cpu")).type), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"a job spec must be JSON (dicts, lists, strings, finite numbers, None): {e}") from e
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _run_specs(fn, specs: list) -> list:
    """Run one unit of a sweep (on a worker or here): ``fn.batched(specs)`` where ``fn`` has one, else ``fn`` per spec."""
    batched = getattr(fn, "batched", None)
    return batched(specs) if batched is not None else [fn(s) for s in specs]


def run_specs(fn, specs: list, cache: Path | None = None, executor=None, progress: bool = True, desc: str = "jobs",
              chunk: int = CHUNK) -> list:
    """The results of the jobs ``fn(spec)`` for every spec of ``specs``, in order, each cached at
    ``cache/<spec_key(fn, spec)>.pt``; identical specs run once.

    ``fn`` is a top-level function (:func:`job_function`); each ``spec`` a JSON dict from which it rebuilds what it
    needs. Where ``fn`` has ``fn.batched(specs) -> results`` and ``fn.group(spec) -> str``, missing specs of one
    group are run ``chunk`` at a time in one call (e.g. :func:`fit_subsets`: one vectorised program), unless
    ``fn.together(spec)`` says that the group of ``spec`` would not train together anyway: then each spec is a unit
    of its own, cached as soon as it finishes, so an interrupted sweep loses at most the runs in flight. ``executor``
    as for :func:`run_jobs`: here, or on the workers of a Dask cluster, where each unit travels as the function's
    name and its specs; there a group is cut into at least as many units as the cluster has slots
    (:func:`_slots`), so that 27 vectorised runs on 8 GPUs are 7 programs of at most 4 models side by side, not one
    program of 27 beside 7 idle GPUs. A failed unit does not stop the others; :class:`JobsFailed` names each failed
    spec."""
    code = code_fingerprint(fn)
    keys = [spec_key(fn, s, code) for s in specs]
    results, paths = load_cached(keys, cache)
    spec_of = dict(zip(keys, specs))
    group = getattr(fn, "group", None)
    groups: dict = {}
    for key in paths:
        groups.setdefault(group(spec_of[key]) if group is not None and hasattr(fn, "batched") else key, []).append(key)
    together = getattr(fn, "together", None)
    slots = _slots(executor) if paths else 1
    units = []
    for members in groups.values():
        size = chunk if together is None or len(members) == 1 or together(spec_of[members[0]]) else 1
        size = min(size, -(-len(members) // slots))  # ⌈members / slots⌉: every slot gets a share
        units += [(part, _run_specs, (fn, [spec_of[k] for k in part]))
                  for part in (members[i:i + size] for i in range(0, len(members), size))]
    _execute(units, paths, results, spec_of, progress, desc, executor)
    return [results[k] for k in keys]


def _probs(model, x):
    return torch.softmax(predict(model, x), 1).cpu()


def _difficulty_recorder(n):
    return [LearningDifficulty(n)]


def _reference_recorders(n):
    return [VisitRecorder(n), LearningDifficulty(n)]


EVALUATIONS = {  # what a retrained model reports, by name: (model, Data, its callbacks) -> CPU tensor (or float)
    "train_correct": lambda m, d, cb: (predict(m, d.x_train).argmax(1).cpu() == d.y_train).float(),
    "test_correct": lambda m, d, cb: (predict(m, d.x_test).argmax(1).cpu() == d.y_test).float(),
    "test_accuracy": lambda m, d, cb: 1 - nll_and_error(m, d.x_test, d.y_test)[1],  # a float
    "train_probs": lambda m, d, cb: _probs(m, d.x_train),
    "test_probs": lambda m, d, cb: _probs(m, d.x_test),
    "test_loss": lambda m, d, cb: torch.nn.functional.cross_entropy(predict(m, d.x_test).cpu().double(), d.y_test,
                                                                    reduction="none"),
    "parameters": lambda m, d, cb: flat_params(m).cpu(),  # θ (P,), in model.parameters() order: the trained model
    # recorded during training (RECORDERS): EL2N summed over every visit (kept,), and per epoch (epochs, kept)
    "learning_difficulty": lambda m, d, cb: cb[0].total,
    "el2n_history": lambda m, d, cb: torch.stack(cb[0].history),
    # all of a reference run at once (mpe.attribution), so that one training serves the model and its dynamics: θ,
    # its buffers (batch-norm statistics: a list in model.buffers() order), right (1) or wrong (0) at every visit
    # (epochs, kept; forgetting events, CBTL) and EL2N at every visit
    "reference": lambda m, d, cb: {"parameters": flat_params(m).cpu(), "buffers": [b.cpu() for b in m.buffers()],
                                   "visit_correct": torch.stack(cb[0].history),
                                   "el2n_history": torch.stack(cb[1].history)},
}
RECORDERS = {  # the callbacks that the evaluations above read, made anew for each run on n kept examples
    "learning_difficulty": _difficulty_recorder,
    "el2n_history": _difficulty_recorder,
    "reference": _reference_recorders,
}
FIT_SPEC_KEYS = ("data", "model", "seed", "kept", "removed", "train", "evaluate", "device")


def fit_subset(spec: dict):
    """The job of a retraining sweep, rebuilt from its description alone: train a fresh model on a subset of a named
    data set, then evaluate it. ``spec``::

        {"data": {"name": "fmnist", "n_train": 4000, "n_test": 1000, "seed": 0},  # mpe.data.from_spec
         "model": {"name": "jiang_mlp"},      # mpe.models.get_model's name and keywords
         "seed": 3,                           # the minibatch order, and the initialisation unless "model" has one
         "kept": [0, 5, ...],                 # training examples kept, in this order (or "removed": sorted indices)
         "train": {"epochs": 10, "lr": 0.1},  # mpe.train.train keywords (no seed)
         "evaluate": "train_correct",         # a name from EVALUATIONS
         "device": "cpu"}                     # where to train ("cuda" on a GPU worker)

    Returns the evaluation (a CPU tensor). See :func:`fit_subsets` for many at once."""
    return fit_subsets([spec])[0]


def _check_fit_spec(spec: dict) -> None:
    missing = {"data", "model", "seed", "train", "evaluate"} - set(spec)
    unknown = set(spec) - set(FIT_SPEC_KEYS)
    if missing or unknown or ("kept" in spec) == ("removed" in spec):
        raise ValueError(f"a fit_subset spec needs data, model, seed, train, evaluate and one of kept/removed "
                         f"(missing {sorted(missing)}, unknown {sorted(unknown)}); got {sorted(spec)}")
    if spec["evaluate"] not in EVALUATIONS:
        raise ValueError(f"unknown evaluation {spec['evaluate']!r}; valid choices: {', '.join(EVALUATIONS)}")
    if "removed" in spec and any(b <= a for a, b in zip(spec["removed"], spec["removed"][1:])):
        raise ValueError("'removed' must list sorted, distinct indices (one spec per subset, so that equal runs share "
                         "a key)")
    if "seed" in spec["train"]:
        raise ValueError("the spec's 'seed' sets the minibatch order; remove 'seed' from 'train'")


def _fit_group(spec: dict) -> str:
    """Specs with equal groups train together: the same everything but the subset and seeds, and the same subset size
    (the steps per epoch depend on it)."""
    _check_fit_spec(spec)
    size = ("kept", len(spec["kept"])) if "kept" in spec else ("removed", len(spec["removed"]))
    rest = {k: v for k, v in spec.items() if k not in ("kept", "removed", "seed")}
    rest["model"] = {k: v for k, v in spec["model"].items() if k != "seed"}
    return json.dumps([rest, size], sort_keys=True)


def fit_subsets(specs: list, vectorise="auto") -> list:
    """:func:`fit_subset` of each spec, in order: the specs of one group (:func:`_fit_group`) are trained together by
    :func:`mpe.train.train_many` where it applies and pays (:func:`vectorise_pays`; results equal one ``train`` per
    spec to float rounding), else one after another."""
    from . import get_device
    from .data import from_spec

    out, groups = [None] * len(specs), {}
    for i, spec in enumerate(specs):
        groups.setdefault(_fit_group(spec), []).append(i)
    for members in groups.values():
        first = specs[members[0]]
        data, dev = from_spec(first["data"]), get_device(first.get("device", "cpu"))
        kw = first["train"]
        n = len(data.y_train)
        todo = [(i, _kept(n, specs[i]["removed"]) if "removed" in specs[i] else torch.as_tensor(specs[i]["kept"]).long(),
                 int(specs[i]["seed"]), None) for i in members]
        size = len(todo[0][1])
        fast = _vectorise_rule(data.x_train[:1], kw, size, vectorise)
        results = {}
        evaluate, record = first["evaluate"], RECORDERS.get(first["evaluate"])
        _fit_chunks(todo, lambda i, seed: _spec_model(specs[i], data, seed).to(dev), data.x_train, data.y_train, kw,
                    lambda m, cb: EVALUATIONS[evaluate](m, data, cb), results, None, chunk=len(todo), vectorised=fast,
                    callbacks=None if record is None else lambda: record(size))
        for i in members:
            out[i] = results[i]
    return out


def _spec_model(spec: dict, data, seed: int = 0):
    """The model a fit_subset spec names (:func:`mpe.models.get_model` of its name and keywords, for ``data``),
    initialised from the model's own seed where the spec gives one, else from ``seed``."""
    from .models import get_model

    kw = {k: v for k, v in spec["model"].items() if k not in ("name", "seed")}
    return get_model(spec["model"]["name"], data.shape, data.n_classes, seed=spec["model"].get("seed", seed), **kw)


def _fit_together(spec: dict) -> bool:
    """Whether :func:`fit_subsets` trains the group of ``spec`` as one vectorised program (see :func:`run_specs`):
    the model and recipe vectorise, and it pays on the spec's device."""
    from .data import from_spec

    data = from_spec(spec["data"])
    size = len(spec["kept"]) if "kept" in spec else len(data.y_train) - len(spec["removed"])
    device = torch.device(spec.get("device", "cpu")).type
    return _vectorise_rule(data.x_train[:1], spec["train"], size, "auto", device)(_spec_model(spec, data))


fit_subset.batched = fit_subsets
fit_subset.group = _fit_group
fit_subset.together = _fit_together


def _kept(n: int, group) -> torch.Tensor:
    """Indices of 0..n-1 without those in ``group``."""
    keep = torch.ones(n, dtype=torch.bool)
    keep[list(group)] = False
    return torch.nonzero(keep).flatten()


def _fit_chunks(todo: list, make_model, x, y, kw: dict, evaluate, results: dict, bar, *, chunk: int, vectorised,
                callbacks=None) -> None:
    """Train and evaluate the runs ``todo`` [(key, kept indices, seed, cache path or None)], ``chunk`` at a time:
    ``make_model(key, seed)`` builds each model; a chunk is trained by :func:`mpe.train.train_many` where
    ``vectorised(first model)`` says so, else one ``train`` per run; then ``results[key] = evaluate(model,
    callbacks)``, saved where a path is given, and ``bar`` (tqdm) moves on. ``callbacks()`` returns new callback
    objects for one run."""
    for i in range(0, len(todo), chunk):
        part = todo[i:i + chunk]
        models = [make_model(key, seed) for key, _, seed, _ in part]
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
        if bar is not None:
            bar.update(len(part))


# ----------------------------------------------------------------------------------------------------------
# Warm-started retrains: the starting network and the data travel as names in a content-addressed store
# ----------------------------------------------------------------------------------------------------------
def stash(obj, store: Path | None = None) -> str:
    """Keep a tensor, or a module (its architecture and parameters, on the CPU), in the content-addressed ``store``
    (default ``default_cache("stash")``: under ``$MPE_RESULTS_DIR``, which on a cluster is the shared file system),
    written once, atomically; returns its name, which a job's spec carries in its place (:func:`unstash`). Equal
    contents get equal names, so a spec that names them is keyed by what it computes from."""
    if isinstance(obj, torch.Tensor):
        name, obj = "t" + tensor_digest(obj), obj.detach().cpu()
    elif isinstance(obj, torch.nn.Module):
        h = hashlib.sha256(f"{type(obj).__module__}.{type(obj).__qualname__}\n{obj!r}".encode())
        for key, value in obj.state_dict().items():
            h.update(f"{key}:{tensor_digest(value)}".encode())
        name, obj = "m" + h.hexdigest()[:16], copy.deepcopy(obj).cpu()
    else:
        raise TypeError(f"stash keeps tensors and modules, not {type(obj).__name__}")
    store = Path(store) if store is not None else default_cache("stash")
    path = store / f"{name}.pt"
    if not path.exists():
        store.mkdir(parents=True, exist_ok=True)
        save_result(path, obj)
    return name


def unstash(name: str, store: Path | None = None):
    """The tensor or module :func:`stash` named ``name`` (a module as a new copy, to train; a tensor shared by the
    jobs of this process: read it, never change it in place); a clear error where the store lacks it."""
    store = Path(store) if store is not None else default_cache("stash")
    path = store / f"{name}.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: a job names a stashed tensor or network that this worker cannot "
                                "see (point $MPE_RESULTS_DIR at the store shared with the process that made the specs)")
    obj = _unstashed(str(path))
    return copy.deepcopy(obj) if isinstance(obj, torch.nn.Module) else obj


@functools.lru_cache(maxsize=16)
def _unstashed(path: str):
    return torch.load(path, weights_only=False)


WARM_SPEC_KEYS = ("start", "x", "y", "probe", "removed", "train", "device")


def warm_retrain(spec: dict) -> torch.Tensor:
    """The job of a removal study: retrain a network from a trained state without some examples, then report its
    softmax outputs on probe inputs. ``spec``::

        {"start": "m…",                  # the trained network θ_* (stash): architecture and parameters
         "x": "t…", "y": "t…",           # its training data (stash)
         "probe": "t…",                  # inputs to report the outputs on (M, ...) (stash)
         "removed": [3],                 # sorted training indices left out ([]: the reference run on all the data)
         "train": {"optimizer": "lbfgs", "lr": 1.0, "epochs": 50, "delta": 1.0},  # mpe.train.train keywords
         "device": "cpu"}

    Returns the softmax outputs (M, K) on the CPU. :func:`warm_retrains` runs many, vectorised where it pays."""
    return warm_retrains([spec])[0]


def _warm_group(spec: dict) -> str:
    """Specs with equal groups retrain together: all but the removed examples are the same."""
    check_spec(spec, WARM_SPEC_KEYS, "warm_retrain")
    if any(b <= a for a, b in zip(spec["removed"], spec["removed"][1:])):
        raise ValueError("'removed' must list sorted, distinct indices")
    return json.dumps({k: v for k, v in spec.items() if k != "removed"}, sort_keys=True)


def _warm_recipe(spec: dict, x: torch.Tensor):
    """The ``train`` keywords of a warm_retrain spec (without a seed: it is the spec's) and the rule that says whether
    its group retrains as one vectorised program (:func:`_vectorise_rule` on the spec's device, for ``x``)."""
    kw = {k: v for k, v in spec["train"].items() if k != "seed"}
    return kw, _vectorise_rule(x[:1], kw, len(x), "auto", torch.device(spec["device"]).type)


def warm_retrains(specs: list) -> list:
    """:func:`warm_retrain` of each spec, in order: the retrains of one group (:func:`_warm_group`) train together by
    :func:`mpe.train.train_many` where it applies and pays (equal to one ``train`` each to float rounding; always
    one by one for a single spec), else one after another."""
    from . import get_device

    out, groups = [None] * len(specs), {}
    for i, spec in enumerate(specs):
        groups.setdefault(_warm_group(spec), []).append(i)
    for members in groups.values():
        first = specs[members[0]]
        dev = get_device(first["device"])
        start = unstash(first["start"]).to(dev)
        x, y, probe = (unstash(first[k]) for k in ("x", "y", "probe"))
        kw, rule = _warm_recipe(first, x)
        todo = [(i, _kept(len(x), specs[i]["removed"]), first["train"].get("seed", 0), None) for i in members]
        fast = (lambda m: False) if len(todo) == 1 else rule
        results = {}
        _fit_chunks(todo, lambda i, seed: copy.deepcopy(start), x, y, kw,
                    lambda m, cb: torch.softmax(predict(m, probe), 1).cpu(), results, None, chunk=len(todo),
                    vectorised=fast)
        for i in members:
            out[i] = results[i]
    return out


def _warm_together(spec: dict) -> bool:
    """Whether :func:`warm_retrains` retrains the group of ``spec`` as one vectorised program (as
    :func:`_fit_together`): L-BFGS never does, so each of its retrains is cached as it finishes."""
    return _warm_recipe(spec, unstash(spec["x"]))[1](unstash(spec["start"]))


warm_retrain.batched = warm_retrains
warm_retrain.group = _warm_group
warm_retrain.together = _warm_together


def retrained_outputs(model, x, y, groups, probe: torch.Tensor, train_kw: dict, cache=None, desc: str = "retrain",
                      vectorise="auto", chunk: int = CHUNK, executor=None):
    """Softmax outputs on ``probe`` after warm-started retraining from ``model``'s parameters θ_* without each group,
    and for a reference run.

    The reference is the same protocol on all the data, so comparing with it cancels any drift of an imperfectly
    converged θ_*. Returns (reference (M, K), [outputs (M, K) per group]). Every run is a job described by data
    (:func:`warm_retrain`): the network, the data and the probe go to the store once (:func:`stash`) and the specs
    name them, so a run is cached under what it computes from, resumes after an interruption, and runs here or on a
    Dask ``executor``. Minibatch recipes that :func:`mpe.train.train_many` can vectorise run up to ``chunk``
    retrains at a time where it pays (``vectorise="auto"``, :func:`vectorise_pays`; False: one by one); any other
    recipe (L-BFGS) runs and caches one retrain at a time, so an interrupted sweep loses at most one. ``model`` is
    not changed."""
    names = dict(start=stash(model), x=stash(x), y=stash(y), probe=stash(probe))
    device = next(model.parameters()).device.type
    specs = [dict(names, removed=sorted(int(i) for i in g), train=train_kw, device=device)
             for g in [[]] + [list(g) for g in groups]]
    outs = run_specs(warm_retrain, specs, cache, executor=executor, desc=desc, chunk=chunk if vectorise else 1)
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
    project's 2-core CPU (forward FLOPs per model and step -> vectorised speed-up of 16 runs, 2026-12-06):
    MLP(32,16) at batch 64, 3M -> 2.2x; the lpNTK CNN at batch 10, 22M -> 1.25x; at batch 40, 87M -> 0.6x; Jiang's
    MLP at batch 64, 68M -> 1.06x; LeNet-5 at batch 64, 53M -> 0.56x. Convolutions decide the rule: vectorise on a
    CPU when the forward FLOPs of one model's minibatch are at most :data:`CPU_VECTORISE_FLOPS`. ``x1`` is one input
    example (1, ...); ``n`` the subset size."""
    device = next(model.parameters()).device
    if device.type != "cpu":
        return True
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x1.to(device))
    return counter.get_total_flops() * min(batch_size or n, n) <= CPU_VECTORISE_FLOPS


def _vectorise_rule(x1: torch.Tensor, kw: dict, size: int, vectorise, device: str | None = None):
    """``model -> bool``: whether a chunk of runs of recipe ``kw`` on ``size`` examples trains as one vectorised
    program: where :func:`mpe.train.train_many` accepts the model and recipe, and ``vectorise`` is True or is "auto"
    and :func:`vectorise_pays`. ``device``: the type of the device the runs will train on, where the model is not
    there (the process that makes a sweep's specs may have no GPU)."""
    def fast(model):
        pays = (device not in (None, "cpu") or vectorise_pays(model, x1, kw.get("batch_size", 256), size)
                if vectorise == "auto" else bool(vectorise))
        return pays and vectorisable(model, **kw) is None
    return fast


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
            fast = _vectorise_rule(x[:1], kw, size, vectorise)
            _fit_chunks(todo, lambda key, seed: make_model(seed), x, y, kw,
                        evaluate if callbacks is not None else lambda m, cb: evaluate(m),
                        results, bar, chunk=chunk, vectorised=fast,
                        callbacks=None if callbacks is None else lambda size=size: callbacks(size))
    return [results[k] for k in keys]
