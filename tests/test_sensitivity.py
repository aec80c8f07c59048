"""MPE estimators: identities, and estimate vs brute-force leave-one-out on a convex model."""
import pytest
import torch
from torch import nn

from mpe import curvature as C
from mpe.sensitivity import FORMS, deviation, loo_nll, residuals, sensitivity
from mpe.train import predict, train


def test_residuals_sum_to_zero_and_are_clamped():
    e = residuals(torch.tensor([[50.0, 0.0, 0.0]]), torch.tensor([0]))
    assert e.abs().min() >= 1e-10 and abs(e.sum().item()) < 1e-6


def test_diag_form_is_the_official_per_class_formula():
    p = torch.tensor([[0.7, 0.2, 0.1]])
    V = torch.diag(torch.tensor([0.3, 0.5, 0.2])).unsqueeze(0) + 0.01
    e = p - torch.tensor([[0.0, 1.0, 0.0]])
    want = (p * (1 - p) * V.diagonal(dim1=1, dim2=2) * e).abs().sum(1)
    torch.testing.assert_close(sensitivity(p, V, e, "diag"), want)


def test_loo_nll_with_zero_variance_is_the_training_nll():
    logits, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    for form in FORMS:
        torch.testing.assert_close(loo_nll(logits, y, torch.zeros(6, 4, 4), form),
                                   nn.functional.cross_entropy(logits, y))


def test_unknown_form_lists_choices():
    with pytest.raises(ValueError, match="valid choices: diag, full, newton"):
        deviation(torch.ones(1, 2) / 2, torch.zeros(1, 2, 2), torch.zeros(1, 2), "exact")


def test_estimates_track_true_leave_one_out_for_softmax_regression(f64):
    """Convex model, exact GGN: the full and Newton forms match brute-force removal; Newton is the closer one."""
    g = torch.Generator().manual_seed(0)
    n, k = 60, 3
    x = torch.randn(n, 1, 1, 4, generator=g)
    y = (x.flatten(1) @ torch.randn(4, k, generator=g)).argmax(1)
    delta = 2.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, k)).double()
    train(model, x, y, optimizer="lbfgs", lr=1, epochs=500, delta=delta, tol=1e-12)
    theta = [p.detach().clone() for p in model.parameters()]
    V = C.predictive_covariance(model, x, C.full_posterior(model, x, delta))
    p = torch.softmax(predict(model, x), 1)
    e = residuals(predict(model, x), y, clamp=False)
    est = {f: deviation(p, V, e, f) for f in ("full", "newton")}
    errs = {"full": [], "newton": []}
    for i in range(8):
        keep = torch.arange(n) != i
        with torch.no_grad():
            for q, t in zip(model.parameters(), theta):
                q.copy_(t)
        train(model, x[keep], y[keep], optimizer="lbfgs", lr=1, epochs=500, delta=delta, tol=1e-12)
        true = torch.softmax(predict(model, x[i:i + 1]), 1)[0] - p[i]
        for f in errs:
            errs[f].append(((est[f][i] - true).norm() / true.norm()).item())
    assert max(errs["full"]) < 0.3
    assert sum(errs["newton"]) < sum(errs["full"])


@pytest.mark.parametrize("source", ["ivon", "adam", "diag", "kfac"])
def test_loo_tracker_matches_a_direct_computation(source):
    from mpe.sensitivity import LOOTracker

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 1, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = {"ivon": "ivon", "adam": "adam"}.get(source, "sgd")
    tracker = LOOTracker(x, y, x[:10], y[:10], at_epochs=[2], source=source, delta=3.0)
    st = train(model, x, y, optimizer=opt, lr=0.01, epochs=2, batch_size=10, delta=3.0, callbacks=[tracker])
    assert [e for e, *_ in tracker.test] == [1, 2] and [e for e, _ in tracker.loo] == [2]
    post = {"ivon": lambda: C.ivon_posterior(st.optimizer), "adam": lambda: C.adam_posterior(st.optimizer, 30, 3.0),
            "diag": lambda: C.diag_posterior(model, x, 3.0), "kfac": lambda: C.kfac_posterior(model, x, 3.0)}[source]()
    V = C.predictive_covariance(model, x, post)
    for form in ("diag", "full"):
        assert tracker.loo[0][1][form] == pytest.approx(loo_nll(predict(model, x), y, V, form).item(), rel=1e-5)
    with pytest.raises(ValueError, match="valid choices: ivon, adam, diag, kfac"):
        LOOTracker(x, y, x, y, [1], "sgd", 1.0)


def test_loco_study_matches_direct_retraining_and_class_means(f64, tmp_path):
    from mpe.sensitivity import loco_study
    from mpe.train import flat_params, set_flat_params

    g = torch.Generator().manual_seed(0)
    x, xt = torch.randn(45, 1, 1, 4, generator=g), torch.randn(20, 1, 1, 4, generator=g)
    w = torch.randn(4, 3, generator=g)
    y, yt = (x.flatten(1) @ w).argmax(1), (xt.flatten(1) @ w).argmax(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    train(model, x, y, optimizer="lbfgs", lr=1, epochs=200, delta=1.0)
    theta = flat_params(model).clone()
    out = loco_study(model, x, y, xt, yt, delta=1.0, posterior="full", retrain_iters=200, cache=tmp_path)
    V = C.predictive_covariance(model, x, C.full_posterior(model, x, 1.0))
    per = loo_nll(predict(model, x), y, V, "diag", reduce=False)
    for row in out:
        c = row["cls"]
        assert row["loco"] == pytest.approx(per[y == c].mean().item())
        set_flat_params(model, theta)
        train(model, x[y != c], y[y != c], optimizer="lbfgs", lr=1, epochs=200, delta=1.0)
        assert row["test_nll"] == pytest.approx(nn.functional.cross_entropy(predict(model, xt), yt).item(), rel=1e-6)
        set_flat_params(model, theta)


def test_group_deviation_forms_agree_for_single_examples_and_differ_for_pairs(f64):
    """For a group of one example the joint and summed forms coincide with the single-example full form."""
    from mpe.sensitivity import group_deviation

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 1, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    train(model, x, y, optimizer="lbfgs", lr=1, epochs=200, delta=1.0)
    post = C.full_posterior(model, x, 1.0)
    single = sensitivity(torch.softmax(predict(model, x), 1), C.predictive_covariance(model, x, post),
                         residuals(predict(model, x), y, clamp=False), "full")
    out = group_deviation(model, x, y, [[3], [7]], post)
    torch.testing.assert_close(out["joint"], single[[3, 7]])
    torch.testing.assert_close(out["sum"], single[[3, 7]])
    both = group_deviation(model, x, y, [[3, 7]], post)
    assert both["sum"].item() == pytest.approx((single[3] + single[7]).item())
    assert both["joint"].item() != pytest.approx(both["sum"].item())  # the off-diagonal block matters
