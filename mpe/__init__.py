"""mpe: a companion package to four papers on how a trained model depends on each training example.

Modules are named after the papers' objects: ``data``, ``models``, ``train``, ``retrain``, ``curvature``,
``sensitivity`` (MPE), ``exact`` (closed-form cases), ``plots`` and ``harness`` (parameters, claims, runner).
"""
from __future__ import annotations

import os
import random

import numpy as np
import torch

__version__ = "0.1.0"
DEVICES = ("cpu", "cuda", "mps", "auto")


def seed_everything(seed: int, threads: int | None = 1, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; pin the CPU thread count (results depend on it); deterministic kernels.

    ``threads=1`` is the default so that stored notebook outputs match on any machine and two notebooks can run
    side by side on two cores; pass ``threads=None`` to leave torch's choice.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads is not None:
        torch.set_num_threads(threads)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def get_device(name: str = "auto") -> torch.device:
    """``cpu``, ``cuda``, ``mps`` or ``auto`` (the first available of cuda, mps, cpu), with a clear error."""
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; valid choices: {', '.join(DEVICES)}")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but torch sees no CUDA GPU; use device='cpu' or 'auto'")
    if name == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was requested but is not available; use device='cpu' or 'auto'")
    if name == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return torch.device(name)
