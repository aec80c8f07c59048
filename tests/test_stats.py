import math

import numpy as np
import pytest
from scipy.stats import spearmanr

from mpe import stats


def test_seed_interval_is_the_student_t_interval():
    est = stats.over_seeds([1.0, 2.0, 3.0])
    # mean 2, sd 1, se 1/sqrt(3); t_{0.975, 2} = 4.302652729911275
    h = 4.302652729911275 / math.sqrt(3)
    assert est.value == 2.0 and est.lo == pytest.approx(2 - h) and est.hi == pytest.approx(2 + h)
    assert stats.over_seeds([0.5, 0.5]).lo == 0.5  # identical reruns: no spread
    assert math.isinf(stats.over_seeds([1.0]).hi)  # one run: no interval, never a verdict
    with pytest.raises(ValueError, match="no values"):
        stats.over_seeds([])


def test_seed_interval_of_a_bounded_statistic_stays_within_its_bounds():
    taus = [1.0, 1.0, 0.6]  # Kendall tau of three runs: the plain t-interval reaches about 1.4
    plain, cut = stats.over_seeds(taus), stats.over_seeds(taus, bounds=(-1, 1))
    assert plain.hi > 1 and cut.hi == 1 and cut.lo == plain.lo and cut.value == plain.value
    assert "cut to [-1, 1]" in cut.method and "cut" not in stats.over_seeds([0.1, 0.2, 0.3], bounds=(-1, 1)).method
    assert stats.over_seeds([0.7], bounds=(-1, 1)).verdict(">=", 0.5) == "inconclusive"  # one run: still no verdict
    with pytest.raises(ValueError, match="within bounds"):
        stats.over_seeds([0.5, 1.5], bounds=(0, 1))


def test_bootstrap_of_a_mean_matches_the_normal_interval():
    x = np.random.default_rng(0).normal(size=400)
    est = stats.bootstrap(np.mean, x, n_boot=2000)
    se = x.std(ddof=1) / math.sqrt(len(x))
    assert est.value == pytest.approx(x.mean())
    assert est.lo == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
    assert est.hi == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)
    assert stats.bootstrap(np.mean, x, n_boot=200).text() == stats.bootstrap(np.mean, x, n_boot=200).text()


def test_bootstrap_is_paired_and_survives_constant_resamples():
    x = np.arange(50.0)
    est = stats.bootstrap(lambda a, b: spearmanr(a, b)[0], x, 2 * x)
    # pairs kept together: every resample is perfectly concordant
    assert est.lo == pytest.approx(1.0) and est.hi == pytest.approx(1.0)
    tiny = stats.bootstrap(lambda a, b: spearmanr(a, b)[0], np.array([0.0, 1.0]), np.array([1.0, 0.0]))
    assert math.isinf(tiny.hi - tiny.lo)  # undefined on half the resamples: unbounded, never a verdict
    with pytest.raises(ValueError, match="share their first axis"):
        stats.bootstrap(np.mean, x, x[:3])


@pytest.mark.parametrize("lo, hi, op, thr, verdict", [
    (0.9, 0.95, ">=", 0.85, "reproduced"), (0.8, 0.9, ">=", 0.85, "inconclusive"), (0.7, 0.8, ">=", 0.85, "not reproduced"),
    (0.1, 0.2, "<=", 0.25, "reproduced"), (0.2, 0.3, "<=", 0.25, "inconclusive"), (0.3, 0.4, "<=", 0.25, "not reproduced"),
    (0.6, 1.5, "between", [0.5, 2], "reproduced"), (0.4, 0.6, "between", [0.5, 2], "inconclusive"),
    (2.1, 3.0, "between", [0.5, 2], "not reproduced"), (-math.inf, math.inf, ">=", 0, "inconclusive"),
])
def test_verdict_from_the_interval(lo, hi, op, thr, verdict):
    assert stats.Estimate((lo + hi) / 2 if math.isfinite(lo) else 0.0, lo, hi, "m").verdict(op, thr) == verdict


def test_precision_follows_the_interval():
    assert stats.Estimate(0.9134, 0.85, 0.97, "m").text() == "0.91 [0.85, 0.97]"
    assert stats.Estimate(12.3, 2.0, 30.0, "m").text() == "12 [2, 30]"
    assert stats.exact(1.23456789e-12).text(12) == "0.000000000001"
    assert stats.Estimate(0.5, -math.inf, math.inf, "single run").text() == "0.5 [unbounded]"
    assert stats.exact(2.0).map(lambda v: -v).value == -2.0
    assert stats.Estimate(1.0, 0.5, 2.0, "m").map(lambda v: 1 / v) == stats.Estimate(1.0, 0.5, 2.0, "m")
    with pytest.raises(ValueError, match="does not hold"):
        stats.Estimate(3.0, 0.0, 1.0, "m")


def test_unpaired_bootstrap_matches_the_two_sample_interval():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0.0, 1.0, 300), rng.normal(0.5, 2.0, 500)
    est = stats.bootstrap(lambda u, v: v.mean() - u.mean(), a, b, paired=False, n_boot=2000)
    se = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    assert est.hi - est.lo == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert "300 + 500" in est.method


def test_pairs_bootstrap_keeps_pairs_of_distinct_examples():
    n = 30
    m = np.arange(n * n, dtype=float).reshape(n, n)
    est = stats.pairs_bootstrap(lambda v: v.size, m, n_boot=50)
    assert est.value == n * (n - 1)  # the diagonal is left out
    diag_marked = np.eye(n) * 1e9
    assert stats.pairs_bootstrap(np.max, diag_marked, n_boot=50).hi == 0.0  # no self-pair ever enters a resample
    with pytest.raises(ValueError, match="pair matrices"):
        stats.pairs_bootstrap(np.mean, m, m[:3, :3])


def test_a_note_goes_with_the_value_not_the_claim():
    est = stats.Estimate(0.5, 0.4, 0.6, "mean of 4 seeds").noted("the better: kfac")
    assert est.method == "mean of 4 seeds; the better: kfac" and (est.lo, est.value, est.hi) == (0.4, 0.5, 0.6)


def test_auroc_is_the_fraction_of_correctly_ordered_pairs():
    from sklearn.metrics import roc_auc_score

    from mpe.stats import auroc

    rng = np.random.default_rng(0)
    labels = rng.random(200) < 0.2
    scores = np.round(rng.standard_normal(200) + labels, 1)  # rounded: many ties
    pos, neg = scores[labels], scores[~labels]
    pairs = (pos[:, None] > neg[None]).mean() + 0.5 * (pos[:, None] == neg[None]).mean()  # brute force over pairs
    assert auroc(labels, scores) == pytest.approx(pairs, abs=1e-12)
    assert auroc(labels.astype(int), scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auroc(labels, -scores) == pytest.approx(1 - pairs, abs=1e-12)
    assert np.isnan(auroc(np.zeros(5), np.arange(5)))
