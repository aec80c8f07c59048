"""Estimates with intervals: what a claims check compares with a threshold.

A claim's measured value is an :class:`Estimate` — a value, a 95 % interval and the method that gave it:

- :func:`over_seeds`: the mean of independent reruns with a Student-t interval (a notebook's cheap runs);
- :func:`bootstrap`: a statistic of examples (or runs) with a percentile interval from resampling them, paired
  across arrays (the same resampled indices for every array), where reruns are too dear;
- :func:`exact`: a deterministic computation (closed forms, parameter counts); the interval is the value itself.

The interval decides the verdict (:meth:`Estimate.verdict`): entirely on the passing side of the threshold is
REPRODUCED, entirely on the failing side NOT REPRODUCED, straddling it INCONCLUSIVE.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np

__all__ = ["Estimate", "over_seeds", "bootstrap", "from_draws", "pairs_bootstrap", "exact", "decimals", "spearman", "pearson",
           "auroc"]

LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    """``value`` with the interval ``[lo, hi]`` (95 %) and the ``method`` that gave it (printed with the claim)."""

    value: float
    lo: float
    hi: float
    method: str

    def __post_init__(self):
        if not self.lo <= self.value <= self.hi and not any(map(math.isnan, (self.lo, self.value, self.hi))):
            raise ValueError(f"interval [{self.lo}, {self.hi}] does not hold the value {self.value}")

    def map(self, fn, method: str | None = None) -> "Estimate":
        """The estimate of a monotone function of this one (the interval's ends map to the new ends)."""
        a, b = fn(self.lo), fn(self.hi)
        return Estimate(float(fn(self.value)), float(min(a, b)), float(max(a, b)), method or self.method)

    def noted(self, note: str) -> "Estimate":
        """The same estimate with ``note`` added to its method: a choice made from the data (which alternative was
        best, which epoch was the minimum), shown with the value rather than in the claim's fixed text."""
        return Estimate(self.value, self.lo, self.hi, f"{self.method}; {note}")

    def verdict(self, op: str, threshold) -> str:
        """``reproduced`` | ``not reproduced`` | ``inconclusive`` for ``value op threshold``."""
        if math.isnan(self.value) or math.isnan(self.lo) or math.isnan(self.hi):
            return "not reproduced"
        if op == ">=":
            passing, failing = self.lo >= threshold, self.hi < threshold
        elif op == "<=":
            passing, failing = self.hi <= threshold, self.lo > threshold
        elif op == "between":
            a, b = threshold
            passing, failing = a <= self.lo and self.hi <= b, self.hi < a or self.lo > b
        else:
            raise ValueError(f"unknown comparison {op!r}; valid choices: >=, <=, between")
        return "reproduced" if passing else "not reproduced" if failing else "inconclusive"

    def text(self, digits: int | None = None) -> str:
        """``0.91 [0.85, 0.97]``: rounded to the precision the interval supports (one significant digit of its
        half-width); an exact value with ``digits`` decimals (else 4 significant digits)."""
        if math.isnan(self.value):
            return "nan"
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f"{self.value:.3g} [unbounded]"
        if self.hi == self.lo:
            return f"{self.value:.{digits}f}" if digits is not None else f"{self.value:.4g}"
        d = decimals(self.lo, self.hi)
        return f"{self.value:.{d}f} [{self.lo:.{d}f}, {self.hi:.{d}f}]"


def decimals(lo: float, hi: float) -> int:
    """Decimals that show one significant digit of the half-width ``(hi - lo) / 2`` (at least 0, at most 8)."""
    hw = (hi - lo) / 2
    if not (hw > 0 and math.isfinite(hw)):
        return 4
    return int(min(8, max(0, -math.floor(math.log10(hw)))))


def over_seeds(values, what: str = "seeds", bounds: tuple[float, float] | None = None) -> Estimate:
    """Mean of ``values`` (K,) from K independent reruns, with the Student-t 95 % interval of the mean.

    With identical values the interval is the value itself; with K = 1 it is unbounded (INCONCLUSIVE). For a
    statistic that cannot leave ``bounds`` (a correlation: (-1, 1); a rate: (0, 1)) the interval is cut to them:
    the mean lies there too, so the cut interval covers it as often, and it never shows a τ of 1.2.
    """
    from scipy.stats import t

    v = np.asarray(values, dtype=float).ravel()
    if v.size == 0:
        raise ValueError(f"no values over {what}")
    low, high = bounds if bounds is not None else (-math.inf, math.inf)
    if not (low < high and np.all((v >= low) & (v <= high))):
        raise ValueError(f"values over {what} must lie within bounds [{low}, {high}]")
    if v.size == 1:  # one run has no spread to measure: an unbounded interval, so never a verdict
        return Estimate(float(v[0]), low, high, f"one of {what}, no interval")
    mean, se = v.mean(), v.std(ddof=1) / math.sqrt(v.size)
    h = float(t.ppf(0.5 + LEVEL / 2, v.size - 1) * se)
    cut = bounds is not None and (mean - h < low or mean + h > high)
    return Estimate(float(mean), float(max(mean - h, low)), float(min(mean + h, high)),
                    f"mean of {v.size} {what}, t-interval" + (f" cut to [{low:g}, {high:g}]" if cut else ""))


def bootstrap(statistic, *arrays, n_boot: int = 1000, seed: int = 0, what: str = "examples",
              paired: bool = True) -> Estimate:
    """``statistic(*arrays)`` with a percentile 95 % interval from ``n_boot`` resamples of the rows.

    ``paired=True``: every array's first axis indexes the same N units (examples, or runs), resampled with
    replacement with the same indices for every array. ``paired=False``: each array is its own sample (training
    and test examples, say), resampled independently. Resamples on which the statistic is not finite (a constant
    resample under a rank correlation) are dropped; if more than 10 % are, the interval is reported as unbounded.
    """
    arrays = [np.asarray(a) for a in arrays]
    sizes = [len(a) for a in arrays]
    if paired and len(set(sizes)) > 1:
        raise ValueError(f"arrays must share their first axis, got lengths {sizes}")
    rng = np.random.default_rng(seed)

    def resample():
        if paired:
            idx = rng.integers(0, sizes[0], sizes[0])
            return [a[idx] for a in arrays]
        return [a[rng.integers(0, len(a), len(a))] for a in arrays]

    with warnings.catch_warnings():  # a constant resample makes a rank correlation undefined: counted below
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's ConstantInputWarning is a RuntimeWarning
        value = float(statistic(*arrays))
        draws = np.array([statistic(*resample()) for _ in range(n_boot)], dtype=float)
    n = sizes[0] if paired else " + ".join(map(str, sizes))
    return from_draws(value, draws, f"bootstrap over {n} {what}, {n_boot} resamples")


def pairs_bootstrap(statistic, *matrices, n_boot: int = 1000, seed: int = 0, what: str = "examples") -> Estimate:
    """``statistic(*values)`` of the off-diagonal entries of (n, n) pair matrices (kernel values of pairs i != j),
    with a percentile 95 % interval from resampling the n *examples*: a resample keeps the pairs among the drawn
    examples (a pair of an example with its own copy is left out), so that the dependence between pairs that share
    an example is respected."""
    mats = [np.asarray(m) for m in matrices]
    n = mats[0].shape[0]
    if any(m.shape != (n, n) for m in mats):
        raise ValueError(f"pair matrices must all be ({n}, {n}), got {[m.shape for m in mats]}")
    off = ~np.eye(n, dtype=bool)
    rng = np.random.default_rng(seed)
    draws = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        value = float(statistic(*(m[off] for m in mats)))
        for _ in range(n_boot):
            idx = rng.integers(0, n, n)
            keep = idx[:, None] != idx[None, :]
            draws.append(statistic(*(m[np.ix_(idx, idx)][keep] for m in mats)))
    return from_draws(value, draws, f"bootstrap over {n} {what} (their pairs), {n_boot} resamples")


def from_draws(value, draws, method: str) -> Estimate:
    """``value`` with the percentile 95 % interval of its bootstrap ``draws`` (K,) (non-finite draws dropped; if more
    than 10 % are, the interval is unbounded)."""
    draws = np.asarray(draws, dtype=float)
    ok = draws[np.isfinite(draws)]
    if ok.size < 0.9 * draws.size or not math.isfinite(value):
        return Estimate(float(value), -math.inf, math.inf, method + " (undefined on many resamples)")
    lo, hi = np.quantile(ok, [(1 - LEVEL) / 2, (1 + LEVEL) / 2])
    return Estimate(float(value), float(min(lo, value)), float(max(hi, value)), method)


def exact(value, why: str = "deterministic computation") -> Estimate:
    """A value with no sampling noise (closed forms, counts); its interval is the value itself."""
    v = float(value)
    return Estimate(v, v, v, why)


def spearman(a, b) -> float:
    """Spearman's rank correlation of two (N,) arrays (a plain float, for :func:`bootstrap`)."""
    from scipy.stats import spearmanr

    return float(spearmanr(np.asarray(a), np.asarray(b))[0])


def pearson(a, b) -> float:
    """Pearson's correlation of two (N,) arrays (a plain float, for :func:`bootstrap`)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def auroc(labels, scores) -> float:
    """The area under the ROC curve of ``scores`` (N,) for the positives of ``labels`` (N,), bool or 0/1: the chance
    that a random positive scores above a random negative, ties counting one half. By the Mann-Whitney identity
    AUROC = (R+ - n+(n+ + 1)/2) / (n+ n-), with R+ the sum of the positives' mid-ranks; about 20 times faster than
    scikit-learn's ``roc_auc_score`` (its input checks), which matters inside :func:`bootstrap`. NaN when one class
    is absent (a bootstrap resample of that kind is then dropped)."""
    from scipy.stats import rankdata

    positive = np.asarray(labels).astype(bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(np.asarray(scores))
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
