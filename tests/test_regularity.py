"""Forgetting events and their Eq. 1 prediction against a hand-written replay of the same SGD run."""
import torch
from torch import nn

from mpe.kernels import delta_q
from mpe.regularity import ForgettingPredictor, precision_recall_f1
from mpe.train import train


def test_precision_recall_f1_by_hand():
    assert precision_recall_f1(3, 1, 2) == (0.75, 0.6, 2 * 0.75 * 0.6 / 1.35)
    assert precision_recall_f1(0, 0, 0) == (1.0, 1.0, 1.0)


def test_forgetting_predictor_matches_a_manual_replay():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 1, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    y[:8] = (y[:8] + 1) % 3  # some noisy labels so that examples get forgotten

    def net():
        torch.manual_seed(1)
        return nn.Sequential(nn.Flatten(), nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))

    model, lr, bs = net(), 0.5, 8
    cb = ForgettingPredictor(x, y)
    train(model, x, y, optimizer="sgd", lr=lr, epochs=3, batch_size=bs, momentum=0.0, schedule="constant", seed=0,
          callbacks=[cb])

    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    prev, counts = None, dict(tp=0, fp=0, fn=0, tn=0)
    for _ in range(3):
        order = torch.randperm(40, generator=gen)
        for s in range(0, 40, bs):
            idx = order[s:s + bs]
            if prev is not None:
                before = model(x[prev]).argmax(1) == y[prev]
                q = torch.softmax(model(x[prev]), 1).detach()
                pred = before & ((q + delta_q(model, x[prev], x[idx], y[idx], lr)).argmax(1) != y[prev])
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            if prev is not None:
                true = before & (model(x[prev]).argmax(1) != y[prev])
                for k, m in (("tp", true & pred), ("fp", ~true & pred), ("fn", true & ~pred), ("tn", ~true & ~pred)):
                    counts[k] += int(m.sum())
            prev = idx
    out = cb.summary()
    assert {k: out[k] for k in counts} == counts
    assert out["events"] == counts["tp"] + counts["fn"] > 0


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
