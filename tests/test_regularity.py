"""Forgetting events and their Eq. 1 prediction against a hand-written replay of the same SGD run."""
import pytest
import torch
from torch import nn

from mpe.data import augmented
from mpe.kernels import delta_q
from mpe.regularity import ForgettingPredictor, precision_recall_f1
from mpe.train import train


def test_precision_recall_f1_by_hand():
    assert precision_recall_f1(3, 1, 2) == (0.75, 0.6, 2 * 0.75 * 0.6 / 1.35)
    assert precision_recall_f1(0, 0, 0) == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("augment", ["none", "crop_flip"])
def test_forgetting_predictor_matches_a_manual_replay(augment):
    """Eq. 1 with the minibatch the step really used (augmented, when training augments), checked on clean examples."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 2, 3, generator=g), torch.randint(0, 3, (40,), generator=g)
    y[:8] = (y[:8] + 1) % 3  # some noisy labels so that examples get forgotten

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    model, lr, bs = net(), 0.5, 8
    cb = ForgettingPredictor(x, y)
    train(model, x, y, optimizer="sgd", lr=lr, epochs=3, batch_size=bs, momentum=0.0, schedule="constant", seed=0,
          callbacks=[cb], augment=augment)

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    prev, counts, errors = None, dict(tp=0, fp=0, fn=0, tn=0), []
    for _ in range(3):
        order = torch.randperm(40, generator=gen)
        for s in range(0, 40, bs):
            idx = order[s:s + bs]
            xb = augmented(x[idx], augment, gen)
            if prev is not None:
                before = model(x[prev]).argmax(1) == y[prev]
                q = torch.softmax(model(x[prev]), 1).detach()
                q_hat = q + delta_q(model, x[prev], xb, y[idx], lr)
                pred = before & (q_hat.argmax(1) != y[prev])
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), y[idx]).backward()
            opt.step()
            if prev is not None:
                true = before & (model(x[prev]).argmax(1) != y[prev])
                for k, m in (("tp", true & pred), ("fp", ~true & pred), ("fn", true & ~pred), ("tn", ~true & ~pred)):
                    counts[k] += int(m.sum())
                onehot = nn.functional.one_hot(y[prev], 3).float()
                q_t = torch.softmax(model(x[prev]), 1).detach()
                errors.append(((q_hat - onehot).norm(dim=1) - (q_t - onehot).norm(dim=1)).abs())
            prev = idx
    out = cb.summary()
    assert {k: out[k] for k in counts} == counts
    assert out["events"] == counts["tp"] + counts["fn"] > 0
    # Eq. 1's error on EL2N: an absolute error (a ratio explodes for confident examples), the median over examples
    assert out["el2n_error"] == pytest.approx(torch.cat(errors).median().item(), rel=1e-5)


def test_learning_difficulty_sums_el2n_before_each_update():
    from mpe.regularity import LearningDifficulty, el2n

    x, y = torch.randn(12, 1, 1, 3), torch.randint(0, 2, (12,))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    ld = LearningDifficulty(12)
    start = [p.detach().clone() for p in net.parameters()]
    train(net, x, y, optimizer="sgd", lr=0.1, epochs=2, batch_size=12, seed=0, callbacks=[ld])
    # full batch: epoch 1 sees the initial parameters, epoch 2 those after one step
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Flatten(), nn.Linear(3, 2))
    assert all(torch.equal(a, b) for a, b in zip(start, ref.parameters()))
    first = el2n(ref(x), y).detach()
    torch.testing.assert_close(ld.history[0], first)
    assert ld.history[1].shape == (12,) and torch.all(ld.history[1] != first)
    torch.testing.assert_close(ld.total, ld.history[0] + ld.history[1])


def test_forgetting_counts_on_a_hand_made_sequence():
    from mpe.regularity import forgetting_counts

    per_example = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 1]])  # rows: examples, cols: visits
    # 1 -> 0 transitions: 2; never correct: inf; 1; 0
    assert forgetting_counts(per_example.T).tolist() == [2.0, float("inf"), 1.0, 0.0]


def test_regularity_measures_on_hand_made_sequences():
    import pytest
    from mpe.regularity import regularity

    per_example = torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 1]])  # rows: examples, cols: time
    r = regularity(per_example.T)
    assert r["cb"].tolist() == [4, 0, 2, 3] and r["cb_norm"].tolist() == [1.0, 0.0, 0.5, 0.75]
    assert r["events"].tolist() == [0, 0, 2, 0] and r["never"].tolist() == [False, True, False, False]
    assert r["events_for_sorting"].tolist() == [0, 4, 2, 0]
    # events are only possible at intermediate cumulative accuracy (the "inverted U" of the notes)
    g = torch.Generator().manual_seed(0)
    rand = regularity((torch.rand(20, 500, generator=g) < 0.5).float())
    assert torch.all(rand["events"] <= torch.minimum(rand["cb"], 20 - rand["cb"]))
    with pytest.raises(ValueError, match="0/1"):
        regularity(torch.full((3, 2), float("nan")))
    # one evaluation of burn-in: the sequences lose their first column, T becomes 3
    b = regularity(per_example.T, burn_in=1)
    assert b["cb"].tolist() == [3, 0, 1, 3]
    torch.testing.assert_close(b["cb_norm"], torch.tensor([1.0, 0.0, 1 / 3, 1.0]))
    assert b["events"].tolist() == [0, 0, 1, 0] and b["events_for_sorting"].tolist() == [0, 3, 1, 0]
    with pytest.raises(ValueError, match="burn_in"):
        regularity(per_example.T, burn_in=4)


# ---- the regularity paper's measures and the Toneva / Jiang baselines, on hand-made values -------------------------
def test_margin_and_true_class_prob_by_hand():
    from mpe.regularity import margin, true_class_prob

    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 0])
    assert margin(logits, y).tolist() == [1.0, -3.0]
    torch.testing.assert_close(true_class_prob(logits, y), torch.softmax(logits, 1)[:, 0])


def test_toneva_statistics_on_hand_made_sequences():
    from mpe.regularity import first_learned, misclassification_margin, unforgettable

    rows = torch.tensor([[0, 1, 1, 1], [1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1], [1, 0, 1, 0]])  # examples x visits
    c = rows.T
    first = first_learned(c)
    assert first[[0, 1, 3, 4]].tolist() == [2.0, 1.0, 1.0, 1.0] and torch.isnan(first[2])
    assert unforgettable(c).tolist() == [True, False, False, True, False]
    m = torch.tensor([[-1.0, 0.5, 0.6, 0.7], [0.5, -0.2, 0.3, 0.4], [-1, -1, -1, -1], [1, 1, 1, 1],
                      [0.5, -0.2, 0.3, -0.4]]).T
    mm = misclassification_margin(c, m)
    torch.testing.assert_close(mm[[1, 4]], torch.tensor([-0.2, -0.3]))
    assert torch.isnan(mm[[0, 2, 3]]).all()


def test_regularity_counts_and_combining_seeds():
    from mpe.regularity import combine_runs, regularity

    a = regularity(torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0]]).T)
    assert a["cb"].tolist() == [2.0, 0.0] and a["events"].tolist() == [2.0, 0.0]
    assert a["never"].tolist() == [False, True] and a["events_for_sorting"].tolist() == [2.0, 4.0]
    b = regularity(torch.tensor([[1, 1, 1, 1], [0, 1, 0, 0]]).T)
    both = combine_runs([a, b])
    assert both["cb_norm"].tolist() == [0.75, 0.125]
    assert both["events"].tolist() == [2.0, 1.0] and both["events_for_sorting"].tolist() == [2.0, 5.0]
    assert both["never"].tolist() == [False, False]


def test_ranking_breaks_ties_at_random_and_windows_tile_the_order():
    from mpe.regularity import ranking, windows

    score = torch.tensor([2.0, 1.0, 2.0, 0.0, 1.0, 2.0])
    orders = {tuple(ranking(score, seed=s).tolist()) for s in range(20)}
    for o in orders:
        assert score[list(o)].tolist() == sorted(score.tolist())
    assert len(orders) > 1  # tie order depends on the seed
    assert ranking(score, descending=True, seed=0)[:3].sort().values.tolist() == [0, 2, 5]
    w = windows(torch.arange(10), 4, 3)
    assert [s for s, _ in w] == [0, 3, 6] and w[1][1].tolist() == [3, 4, 5, 6]
    with pytest.raises(ValueError):
        windows(torch.arange(3), 4, 1)


def test_cscore_holdout_averages_heldout_correctness_per_ratio(tmp_path):
    from mpe.regularity import cscore_holdout

    n, calls = 30, []
    g = torch.Generator().manual_seed(0)

    def fit_predict(train_idx, heldout_idx, run_seed):
        assert len(set(train_idx.tolist()) & set(heldout_idx.tolist())) == 0
        assert len(train_idx) + len(heldout_idx) == n
        out = torch.randint(0, 2, (len(heldout_idx),), generator=g)
        calls.append((len(train_idx), heldout_idx.clone(), out))
        return out

    res = cscore_holdout(fit_predict, n, ratios=(0.2, 0.6), runs=3, cache=tmp_path, tag=dict(t=1), progress=False)
    assert len(calls) == 6
    for i, k in enumerate((6, 18)):  # ⌊s n⌋ training examples per ratio
        hits, cnt = torch.zeros(n), torch.zeros(n)
        for size, ho, out in calls:
            if size == k:
                hits[ho] += out.float()
                cnt[ho] += 1
        torch.testing.assert_close(res["per_ratio"][i], hits / cnt, equal_nan=True)
        assert res["counts"][i].tolist() == cnt.tolist()
    again = cscore_holdout(fit_predict, n, ratios=(0.2, 0.6), runs=3, cache=tmp_path, tag=dict(t=1), progress=False)
    assert len(calls) == 6  # every run came from the cache
    torch.testing.assert_close(again["score"], res["score"], equal_nan=True)


def test_detection_curve_and_binned_accuracy_by_hand():
    from mpe.regularity import binned_accuracy, detection_curve

    checked, found = detection_curve(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([True, False, True]))
    torch.testing.assert_close(checked, torch.tensor([0, 1 / 3, 2 / 3, 1]))
    torch.testing.assert_close(found, torch.tensor([0.0, 0.5, 1.0, 1.0]))
    correct = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 0]])
    acc, counts = binned_accuracy(correct, torch.tensor([0.0, 0.2, 0.5, 1.0, 0.9]), [0.0, 0.5, 1.0])
    assert counts.tolist() == [2, 3]
    torch.testing.assert_close(acc, torch.tensor([[0.5, 2 / 3], [1.0, 1 / 3]]))


def test_unified_run_full_batch_visit_equals_previous_epoch_end():
    """With full-batch steps the visit of epoch e sees the parameters at the end of epoch e-1: the online and the
    offline histories are the same sequence shifted by one epoch (a deterministic model, no dropout)."""
    from mpe.data import Data
    from mpe.regularity import unified_run

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(60, 1, 1, 4, generator=g), torch.randint(0, 3, (60,), generator=g)
    data = Data("toy", x[:40], y[:40], x[40:], y[40:], ("a", "b", "c"))
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3))
    out = unified_run(net, data, epochs=6, lr=0.5, batch_size=None, momentum=0.0, schedule="constant")
    assert out["train_visit"].shape == out["train_epoch"].shape == (6, 40) and out["test_epoch"].shape == (6, 20)
    torch.testing.assert_close(out["train_visit"][1:], out["train_epoch"][:-1])
    torch.testing.assert_close(out["test_acc"], out["test_epoch"].mean(1))
    assert (out["train_margin"] > 0).eq(out["train_visit"] == 1).all()


def test_subset_runs_cache_each_distinct_run_once(tmp_path):
    from mpe.retrain import subset_runs

    calls = []

    def fit(idx, seed):
        calls.append((tuple(idx.tolist()), seed))
        return float(idx.sum()) + seed

    subsets = [(torch.tensor([0, 1]), 0), (torch.tensor([0, 1]), 0), (torch.tensor([2]), 1)]
    assert subset_runs(fit, subsets, dict(study="t"), tmp_path) == [1.0, 1.0, 3.0]
    assert len(calls) == 2
    assert subset_runs(fit, subsets, dict(study="t"), tmp_path) == [1.0, 1.0, 3.0] and len(calls) == 2


def test_sgd_recipe_is_torch_sgd_with_per_example_weight_decay():
    from mpe.regularity import sgd_recipe
    from mpe.train import flat_params

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 1, 4, generator=g), torch.randint(0, 3, (20,), generator=g)

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))

    ours = net()
    kw = sgd_recipe(20, epochs=2, lr=0.1, momentum=0.9, batch_size=None, weight_decay=0.01, nesterov=True)
    train(ours, x, y, **kw)
    ref = net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        opt.step()
    torch.testing.assert_close(flat_params(ours), flat_params(ref))
    assert sgd_recipe(20, epochs=2, lr=0.1, momentum=0.5, batch_size=4) == sgd_recipe(
        20, epochs=2, lr=0.1, momentum=0.5, batch_size=4, weight_decay=0.0, milestones=[60, 120, 160])


def test_cscore_from_subset_fits_equals_cscore_holdout(tmp_path):
    """The notebook's route (splits, then subset_fits returning correctness on all N, then cscore_from_runs) gives
    the C-scores of cscore_holdout with per-run held-out predictions."""
    from mpe.models import get_model
    from mpe.regularity import cscore_from_runs, cscore_holdout, cscore_splits
    from mpe.retrain import subset_fits
    from mpe.train import predict, train

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 4, 4, generator=g), torch.randint(0, 3, (40,), generator=g)
    kw = dict(epochs=2, lr=0.1, batch_size=8)

    def fit_predict(tr, ho, seed):
        net = get_model("mlp", (1, 4, 4), 3, seed=seed)
        train(net, x[tr], y[tr], seed=seed, **kw)
        return (predict(net, x[ho]).argmax(1) == y[ho]).float()

    ref = cscore_holdout(fit_predict, 40, ratios=(0.25, 0.5), runs=3, progress=False)
    splits = cscore_splits(40, (0.25, 0.5), 3)
    correct = subset_fits(lambda s: get_model("mlp", (1, 4, 4), 3, seed=s), x, y, [(tr, s) for _, tr, _, s in splits],
                          kw, lambda net: (predict(net, x).argmax(1) == y).float(), dict(t=2), tmp_path,
                          vectorise=False, progress=False)  # the route, not train_many (tested on its own)
    got = cscore_from_runs(splits, correct, 40)
    assert got["counts"].sum() == sum(len(ho) for _, _, ho, _ in splits)
    torch.testing.assert_close(got["per_ratio"], ref["per_ratio"], equal_nan=True)
    with pytest.raises(ValueError, match="ratios"):
        cscore_splits(40, (0.0, 0.5), 3)


def test_cscore_splits_hold_out_every_example_once_per_round():
    """Rounds of ⌈N/h⌉ runs: each run holds out h = N − ⌊sN⌋ examples, disjoint from its training set, and every
    complete round holds out every example (at least once; exactly once where h divides N)."""
    from mpe.regularity import cscore_from_runs, cscore_splits

    n = 30
    splits = cscore_splits(n, ratios=(0.25, 0.5, 0.8), runs=6, seed=3)
    for i, s in enumerate((0.25, 0.5, 0.8)):
        runs = [(tr, ho) for j, tr, ho, _ in splits if j == i]
        h = n - int(s * n)
        m = -(-n // h)
        for tr, ho in runs:
            assert len(ho) == h and len(tr) == n - h and not set(tr.tolist()) & set(ho.tolist())
        for start in range(0, len(runs) - m + 1, m):  # complete rounds
            held = torch.cat([ho for _, ho in runs[start:start + m]])
            assert set(held.tolist()) == set(range(n))
            if n % h == 0:
                assert len(held) == n  # a partition
    assert not torch.equal(splits[0][2], splits[2][2])  # rounds draw fresh permutations
    # the integral score is NaN where a ratio has no estimate, never an average of the ratios an example has
    res = cscore_from_runs([(0, None, torch.tensor([0, 1]), 0), (1, None, torch.tensor([1, 2]), 0)],
                           [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])], 3)
    assert res["score"][1] == 0.5 and res["score"][0].isnan() and res["score"][2].isnan()


def test_unified_runs_of_described_data_are_jobs_described_by_data(tmp_path):
    """Data that carries its description runs as spec jobs (a worker rebuilds it), with the results of the closures
    over its tensors; a second call trains nothing."""
    from dataclasses import replace

    from mpe.data import load
    from mpe.regularity import unified_runs

    data = load("digits").subset(150, 60, seed=0)
    kw = dict(epochs=2, lr=0.1, batch_size=32, momentum=0.5)
    described = unified_runs(data, "mlp", [1, 2], cache=tmp_path / "spec", progress=False, **kw)
    closures = unified_runs(replace(data), "mlp", [1, 2], cache=tmp_path / "closure", progress=False, **kw)
    for a, b in zip(described, closures):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "spec").iterdir())) == 2
    again = unified_runs(data, "mlp", [1, 2], cache=tmp_path / "spec", progress=False, **dict(kw))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(described, again) for k in a)
