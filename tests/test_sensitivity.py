"""MPE estimators: identities, and estimate vs brute-force leave-one-out on a convex model."""
import copy

import numpy as np
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
    p = torch.softmax(predict(model, x), 1)
    residual = sum((p[i] - torch.eye(3)[y[i]]).norm() for i in range(30)) / 30
    trace = sum(V[i, k, k] for i in range(30) for k in range(3)) / 30
    row = tracker.rows(fit=True)[0]
    assert row["train_residual"] == pytest.approx(residual.item(), rel=1e-5)
    assert row["trace_v"] == pytest.approx(trace.item(), rel=1e-5)
    assert "trace_v" not in tracker.rows()[0]
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
        pred = predict(model, xt).argmax(1)
        assert row["removed_acc"] == pytest.approx((pred[yt == c] == c).double().mean().item())
        assert row["removed_acc"] < row["base_removed_acc"]  # a converged retrain forgets the class
        logits, k = predict(model, xt), yt == c
        assert row["removed_nll"] == pytest.approx(nn.functional.cross_entropy(logits[k], yt[k]).item(), rel=1e-6)
        assert row["rest_nll"] == pytest.approx(nn.functional.cross_entropy(logits[~k], yt[~k]).item(), rel=1e-6)
        assert row["base_rest_nll"] != pytest.approx(row["rest_nll"])
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


def test_sampled_residuals_match_gauss_hermite_quadrature(f64):
    """K = 2 with independent logit noise: E[softmax(f + σ ε)] by 2-D Gauss–Hermite quadrature is the truth."""
    import numpy as np
    from mpe.sensitivity import sampled_residuals

    f, var = torch.tensor([[1.5, -0.5]]), torch.tensor([[0.8, 0.3]])
    t, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()
    a = f[0, 0].item() + np.sqrt(var[0, 0].item()) * t[:, None]
    b = f[0, 1].item() + np.sqrt(var[0, 1].item()) * t[None, :]
    p0 = (w[:, None] * w[None, :] / (1 + np.exp(b - a))).sum()
    e = sampled_residuals(f, torch.tensor([0]), var, 20000, torch.Generator().manual_seed(0))
    assert abs(e[0, 0].item() - (p0 - 1)) < 3e-3 and abs(e.sum().item()) < 1e-9
    # zero variance gives the plain residual
    torch.testing.assert_close(sampled_residuals(f, torch.tensor([1]), torch.zeros(1, 2, 2), 3),
                               residuals(f, torch.tensor([1]), clamp=False))


def test_sorted_bins_and_top_share_on_hand_made_values():
    from mpe.sensitivity import sorted_bins, top_share

    values = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [6.0, 1.0, 5.0, 2.0, 4.0, 3.0]])
    # order by the last row: examples 1, 3, 5, 4, 2, 0
    torch.testing.assert_close(sorted_bins(values, 3), torch.tensor([[3.0, 5.5, 2.0], [1.5, 3.5, 5.5]]))
    torch.testing.assert_close(sorted_bins(values[:, :5], 2), torch.tensor([[11 / 3, 2.0], [7 / 3, 5.5]]))  # bins of 3 and 2
    torch.testing.assert_close(top_share(values, 1 / 3), torch.tensor([11 / 21, 11 / 21]))
    torch.testing.assert_close(top_share(torch.ones(10), 0.1), torch.tensor([0.1]))
    with pytest.raises(ValueError, match="n_bins"):
        sorted_bins(values, 7)


def test_sensitivity_tracker_uses_the_ivon_posterior_at_the_chosen_steps():
    from mpe.sensitivity import SensitivityTracker

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 1, 1, 5, generator=g), torch.randint(0, 3, (40,), generator=g)
    net = nn.Sequential(nn.Flatten(), nn.Linear(5, 3))
    tr = SensitivityTracker(x, y, at_steps=[2, 8], source="ivon", n_samples=0)
    state = train(net, x, y, optimizer="ivon", lr=0.05, epochs=2, batch_size=10, delta=1.0, callbacks=[tr])
    steps, values = tr.result()
    assert steps == [2, 8] and values.shape == (2, 40)
    V = C.predictive_covariance(net, x, C.ivon_posterior(state.optimizer))
    logits = predict(net, x)
    torch.testing.assert_close(values[-1], sensitivity(torch.softmax(logits, 1), V, residuals(logits, y), "diag"))
    with pytest.raises(ValueError, match="valid choices: ivon, diag, kfac"):
        SensitivityTracker(x, y, [1], source="adam")


def test_loo_gaps_bootstrap_is_paired_across_trackers():
    from types import SimpleNamespace

    from mpe.sensitivity import loo_gaps

    rng = torch.Generator().manual_seed(0)
    loo, test = torch.rand(40, generator=rng) + 0.5, torch.rand(30, generator=rng) + 0.5

    def tracker(scale):
        return SimpleNamespace(x=torch.zeros(40), x_test=torch.zeros(30), per_example={3: ({"diag": scale * loo}, test)})

    g = loo_gaps({"a": tracker(1.0), "b": tracker(2.0)}, n_boot=200)
    va, da = g["a"]
    assert va == pytest.approx(abs(loo.double().mean() - test.double().mean()).item() / test.double().mean().item())
    # the same resampled test examples for both: (2 loo - test) - (loo - test) = loo, exactly, in every draw
    # draws: the same resampled indices, training and test examples drawn independently (seed 0)
    r = np.random.default_rng(0)
    it, jt = r.integers(0, 40, (200, 40)), r.integers(0, 30, (200, 30))
    a, b = loo.double().numpy()[it].mean(1), test.double().numpy()[jt].mean(1)
    assert np.allclose(da, np.abs(a - b) / b)
    assert np.allclose(g["b"][1], np.abs(2 * a - b) / b)


def test_matched_beta2_moves_ivon_hessian_by_the_papers_share():
    import ivon

    from mpe.sensitivity import hess_moved, matched_beta2

    paper_share = 1 - 0.99999 ** 23500  # Fig. 5: 21 % of the way from h0
    b = matched_beta2(23500, 200)
    assert 1 - b ** 200 == pytest.approx(paper_share)
    assert matched_beta2(500, 500) == pytest.approx(0.99999)
    with pytest.raises(ValueError, match="positive"):
        matched_beta2(0, 10)
    # a constant data Hessian: h moves the share 1 - beta2^T from h0 to it (the correction term is second order)
    w = torch.nn.Parameter(torch.zeros(50))
    opt = ivon.IVON([w], lr=1e-3, ess=1.0, hess_init=1.0, beta2=b, weight_decay=0.0)
    assert hess_moved(opt) == 0.0
    for _ in range(200):
        with opt.sampled_params(train=True):
            loss = 0.5 * 3.0 * (w ** 2).sum()  # Hessian 3 in every coordinate
            loss.backward()
        opt.step()
        opt.zero_grad()
    assert hess_moved(opt) == pytest.approx(2.0 * paper_share, rel=0.1)  # |3 - 1| / 1 of the way


def test_newton_form_is_nan_where_the_leverage_reaches_one():
    from mpe.sensitivity import leverage, logit_shift

    p = torch.tensor([[0.5, 0.5], [0.5, 0.5]], dtype=torch.float64)
    e = torch.tensor([[0.5, -0.5], [0.5, -0.5]], dtype=torch.float64)
    # Λ = [[.25, -.25], [-.25, .25]]: with V = c I the leverage is 0.5 c
    V = torch.stack([torch.eye(2, dtype=torch.float64), 4 * torch.eye(2, dtype=torch.float64)])
    assert leverage(p, V).tolist() == pytest.approx([0.5, 2.0])
    shift = logit_shift(V, e, p, "newton")
    # h = 0.5: (I - ΛV)^{-1} e = e / (1 - 0.5) since e is Λ's eigenvector with eigenvalue 0.5
    assert shift[0].tolist() == pytest.approx((2 * e[0]).tolist())
    assert torch.isnan(shift[1]).all()


def test_loo_during_training_shares_identical_runs():
    from types import SimpleNamespace

    from mpe.sensitivity import loo_during_training

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(30, 1, 1, 4, generator=g), torch.randint(0, 3, (30,), generator=g)
    data = SimpleNamespace(x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))

    sgd = dict(optimizer="sgd", lr=0.1, lr_min=0.01)
    kw = dict(at_epochs=[2], epochs=2, batch_size=10, delta=1.0, progress=False)
    shared = loo_during_training(make, data, {"diag": dict(sgd, source="diag"), "kfac": dict(sgd, source="kfac")}, **kw)
    alone = loo_during_training(make, data, {"kfac": dict(sgd, source="kfac")}, **kw)
    assert list(shared) == ["diag", "kfac"]
    assert shared["kfac"].loo == alone["kfac"].loo and shared["kfac"].test == alone["kfac"].test
    assert shared["diag"].test == shared["kfac"].test  # one run, seen by both trackers


def test_loo_sweep_newton_form_is_brute_force_leave_one_out_on_a_glm(f64, tmp_path, monkeypatch):
    """Fig. 4's sweep on softmax regression with the exact GGN: the leverage lies in (0, 1), and the Newton form's
    per-example LOO NLL is, to within 5 %, the NLL of example i under a model retrained without it (one Newton step
    from θ_*, so not exact); the first-order forms miss it by several times more."""
    from mpe.sensitivity import loo_job, loo_sweep

    monkeypatch.setenv("MPE_RESULTS_DIR", str(tmp_path))  # the stash of the initial network and the data
    g = torch.Generator().manual_seed(1)
    n, k = 40, 3
    x = torch.randn(n + 20, 1, 1, 4, generator=g)
    y = (x.flatten(1) @ torch.randn(4, k, generator=g) + 0.5 * torch.randn(n + 20, k, generator=g)).argmax(1)

    def make_model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Flatten(), nn.Linear(4, k)).double()

    deltas = [0.3, 3.0]
    sweep = loo_sweep(make_model, x[:n], y[:n], x[n:], y[n:], deltas, fit_iters=500, posterior="full")
    for delta, r in zip(deltas, sweep):
        assert r["delta"] == delta and 0 < r["leverage"].min() and r["leverage"].max() < 1
        assert r["loo"]["newton"] == pytest.approx(float(r["loo_per_example"]["newton"].mean()))
        assert r["test_nll"] == pytest.approx(float(r["test_per_example"].mean()))
        true = []
        for i in range(10):
            keep = torch.arange(n) != i
            model = make_model()
            train(model, x[:n][keep], y[:n][keep], optimizer="lbfgs", lr=1, epochs=500, delta=delta, tol=1e-12)
            true.append(nn.functional.cross_entropy(predict(model, x[i:i + 1]), y[i:i + 1]).item())
        true = torch.tensor(true)
        err = {f: (r["loo_per_example"][f][:10] - true).abs().mean() / true.mean() for f in FORMS}
        assert err["newton"] < 0.05 and err["newton"] < err["full"] / 3 and err["newton"] < err["diag"] / 3, err
    with pytest.raises(ValueError, match="a loo_job spec needs exactly .*missing \\['delta'"):
        loo_job(dict(start="m", x="t", y="t", x_test="t", y_test="t", fit_iters=5, posterior="full", device="cpu"))


def fitted_softmax_regression(n, d, seed, iters):
    """(model at θ_* with δ = 1, x (n, 1, 1, d), y (n,) of 3 classes) for the removal truths below."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 1, 1, d, generator=g), torch.randint(0, 3, (n,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 3)).double()
    train(model, x, y, optimizer="lbfgs", lr=1, epochs=iters, delta=1.0)
    return model, x, y


def warm_retrained(model, x, y, keep, **recipe):
    """Softmax outputs on all of x after retraining a copy of ``model`` (warm start) on x[keep] with δ = 1."""
    net = copy.deepcopy(model)
    train(net, x[keep], y[keep], delta=1.0, **recipe)
    return torch.softmax(predict(net, x), 1)


def test_group_removal_truth_is_a_warm_started_lbfgs_retrain_without_the_group(f64):
    from mpe.sensitivity import group_removal_truth

    model, x, y = fitted_softmax_regression(24, 3, seed=4, iters=100)
    groups = [[1, 2], [5], [0, 7, 9]]
    truth = group_removal_truth(model, x, y, groups, delta=1.0, retrain_iters=30)
    lbfgs = dict(optimizer="lbfgs", lr=1.0, epochs=30)
    ref = warm_retrained(model, x, y, torch.ones(24, dtype=torch.bool), **lbfgs)
    for group, t in zip(groups, truth):
        keep = torch.ones(24, dtype=torch.bool)
        keep[group] = False
        assert t.item() == pytest.approx((warm_retrained(model, x, y, keep, **lbfgs)[group] - ref[group]).abs().sum().item(),
                                         rel=1e-6)
    assert (truth > 0).all()


def test_removal_study_truth_is_a_warm_started_retrain_with_the_given_recipe(f64):
    """The truth of Fig. 2 by hand: warm start at θ_*, retrain without i (and, for the reference, with all the data)
    with the recipe given, then Σ_k |σ(f_i(θ^{\\i}))_k − σ(f_i(θ_ref))_k|."""
    from mpe.sensitivity import removal_study, removal_truth

    model, x, y = fitted_softmax_regression(30, 4, seed=2, iters=200)
    recipe = dict(optimizer="sgd", lr=0.05, epochs=5, batch_size=8, seed=3)
    study = removal_study(model, x, y, delta=1.0, removed=[4, 11], posterior="full", retrain=recipe)
    assert torch.equal(removal_truth(model, x, y, [4, 11], delta=1.0, retrain=recipe), study["truth"])  # the study's truth

    def retrained(keep):
        return warm_retrained(model, x, y, keep, **recipe)

    ref = retrained(torch.ones(30, dtype=torch.bool))
    for i, truth in zip([4, 11], study["truth"]):
        keep = torch.arange(30) != i
        assert truth.item() == pytest.approx((retrained(keep)[i] - ref[i]).abs().sum().item(), rel=1e-9)
    assert study["truth_check"] is None and truth > 0


def test_iblr_posterior_is_ivons_hessian_estimate_at_a_fixed_mean():
    """Least squares has the constant Hessian diag(mean x_d²) per weight and 1 per bias (per example, ½‖f − y‖²):
    IVON run at lr 0 must find it from its one-sample estimates, whatever h0, and leave the model as it was."""
    from mpe.sensitivity import iblr_posterior

    g = torch.Generator().manual_seed(0)
    n = 400
    x = torch.randn(n, 3, generator=g) * torch.tensor([0.5, 1.0, 2.0])
    y = x @ torch.randn(3, 2, generator=g) + 0.05 * torch.randn(n, 2, generator=g)
    model = nn.Linear(3, 2)
    with torch.no_grad():  # the least-squares solution, so that minibatch gradients at the mean are small
        sol = torch.linalg.lstsq(torch.cat([x, torch.ones(n, 1)], 1), y).solution
        model.weight.copy_(sol[:3].T)
        model.bias.copy_(sol[3])
    before = [p.detach().clone() for p in model.parameters()]
    delta = 1.0
    post = iblr_posterior(model, x, y, delta, epochs=100, window=20, batch_size=20, loss="squared")
    h = (post.data - delta) / n
    want = torch.cat([(x ** 2).mean(0).repeat(2), torch.ones(2)])  # weight (2, 3) row-major, then bias (2,)
    rel = (h / want - 1).abs()
    assert post.kind == "diag" and post.delta == pytest.approx(delta)
    assert rel.mean() < 0.1 and rel.max() < 0.25, rel
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    torch.rand(3)  # whatever the global generator did before, the same seed gives the same estimate
    again = iblr_posterior(model, x, y, delta, epochs=100, window=20, batch_size=20, loss="squared")
    assert torch.equal(again.data, post.data)
    with pytest.raises(ValueError, match="window <= epochs"):
        iblr_posterior(model, x, y, delta, epochs=2, window=3, loss="squared")
    with pytest.raises(ValueError, match="lr = 0 for IVON only"):
        train(model, x, y, epochs=1, lr=0.0, loss="squared")
