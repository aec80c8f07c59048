"""Ground truth by retraining, as a list of independent jobs with cached results.

Each job has a key (a short hash of everything that defines it); its result is written atomically to
``<cache>/<key>.pt`` when it finishes. Running the same sweep again loads finished jobs and computes only the
missing ones, so an interrupted sweep resumes where it stopped, and jobs could later be fanned out to several
workers.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .train import flat_params, predict, set_flat_params, train

__all__ = ["job_key", "tensor_digest", "run_jobs", "removal_jobs", "retrained_outputs", "default_cache", "subset_runs"]


def default_cache(name: str) -> Path:
    """``$MPE_RESULTS_DIR/<name>`` (default ``build/cache/<name>`` under the working directory's repository)."""
    root = os.environ.get("MPE_RESULTS_DIR")
    if root is None:
        from .harness import repo_root

        root = repo_root() / "build" / "cache"
    return Path(root) / name


PRESENTATION = ("harness.py", "plots.py", "stats.py")  # they read results, never compute a job's result


def code_fingerprint() -> str:
    """Hash of the package's source files that compute results: part of every job key, so results cached by older
    code are never reused. The presentation modules (:data:`PRESENTATION`) are left out: a new claims format or plot
    style does not retrain anything."""
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        if f.name not in PRESENTATION:
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def job_key(**spec) -> str:
    """Stable 16-hex-digit key of a JSON-serialisable job description (and of the code that runs it)."""
    blob = json.dumps(dict(spec, _code=code_fingerprint()), sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    """Short hash of a tensor's values, dtype and shape (for cache keys)."""
    t = t.detach().cpu().contiguous()
    return hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.numpy().tobytes()).hexdigest()[:16]


def run_jobs(jobs: dict, cache: Path | None = None, progress: bool = True, desc: str = "jobs") -> dict:
    """Run ``jobs`` {key: zero-argument callable}, caching each result as ``cache/<key>.pt``; returns {key: result}."""
    results, todo = {}, []
    if cache is not None:
        cache = Path(cache)
        cache.mkdir(parents=True, exist_ok=True)
    for key, fn in jobs.items():
        path = cache / f"{key}.pt" if cache is not None else None
        if path is not None and path.exists():
            results[key] = torch.load(path, weights_only=False)
        else:
            todo.append((key, fn, path))
    it = todo
    if progress and todo:
        from tqdm.auto import tqdm

        it = tqdm(todo, desc=f"{desc} ({len(results)} cached)")
    for key, fn, path in it:
        res = fn()
        if path is not None:
            tmp = path.with_suffix(".tmp")
            torch.save(res, tmp)
            os.replace(tmp, path)  # atomic: an interrupted job leaves no half-written result
        results[key] = res
    return results


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
            keep = torch.ones(n, dtype=torch.bool)
            keep[list(group)] = False
            train(model, x[keep], y[keep], **train_kw)
            out = torch.softmax(predict(model, probe), 1).cpu()
            set_flat_params(model, theta)
            return out
        return job

    digests = dict(theta=tensor_digest(theta), data=tensor_digest(x) + tensor_digest(y), probe=tensor_digest(probe))
    return {job_key(group=list(map(int, g)), train=train_kw, **digests, **tag): make(g) for g in removed}


def retrained_outputs(model, x, y, groups, probe: torch.Tensor, train_kw: dict, tag: dict, cache=None,
                      desc: str = "retrain"):
    """Softmax outputs on ``probe`` after warm-started retraining without each group, and for a reference run.

    The reference is the same protocol on all the data, so comparing with it cancels any drift of an imperfectly
    converged θ_*. Returns (reference (M, K), [outputs (M, K) per group]); every run is a cached job.
    """
    jobs = removal_jobs(model, x, y, [[]] + [list(g) for g in groups], probe, train_kw, tag)
    res = run_jobs(jobs, cache, desc=desc)
    outs = [res[k] for k in jobs]
    return outs[0], outs[1:]


def subset_runs(fit, subsets: list, tag: dict, cache=None, desc: str = "retrain") -> list:
    """Train from scratch on each kept subset: ``subsets`` is [(kept indices, seed)] and ``fit(kept, seed)`` returns
    the result (e.g. the test accuracy). Each run is a cached job keyed by ``tag`` (data, model and every training
    setting), the seed and a digest of the kept indices; identical runs are computed once."""
    keys = [job_key(kept=tensor_digest(torch.as_tensor(idx)), seed=int(seed), **tag) for idx, seed in subsets]
    jobs = {k: (lambda idx=idx, seed=seed: fit(idx, seed)) for k, (idx, seed) in zip(keys, subsets)}
    res = run_jobs(jobs, cache, desc=desc)
    return [res[k] for k in keys]
