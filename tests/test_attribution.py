"""mpe.attribution against independent truth: the inverse of the posterior precision, brute-force leave-one-out
retrains of a convex model, hand-made correlations, and dattri's own metrics and influence functions."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpe import attribution as A
from mpe import curvature as C
from mpe.models import get_model
from mpe.train import flat_params, train


def _toy(n=60, m=15, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, k, generator=g)
    x = torch.randn(n + m, d, generator=g)
    y = (x @ w + 0.7 * torch.randn(n + m, k, generator=g)).argmax(1)
    return x[:n], y[:n], x[n:], y[n:]


def _fit(x, y, delta, seed=0):
    net = get_model("mlp", (6,), 3, seed=seed, hidden=(), activation="tanh").double()
    train(net, x.double(), y, epochs=300, lr=1.0, optimizer="lbfgs", delta=delta, batch_size=None)
    return net


@pytest.mark.parametrize("kind", ["full", "diag", "kfac"])
def test_posterior_solve_inverts_the_precision(kind):
    torch.manual_seed(0)
    net = get_model("mlp", (6,), 3, seed=0, hidden=(5,)).double()
    x = torch.randn(40, 6, dtype=torch.float64)
    post = C.laplace_posterior(kind, net, x, delta=0.3)
    v = torch.randn(4, sum(p.numel() for p in net.parameters()), dtype=torch.float64)
    u = A.posterior_solve(net, post, v)
    if kind == "full":
        back = u @ post.data.T
    elif kind == "diag":
        back = u * post.data
    else:  # S u per layer: (1/count) G U A + δ U on the (out, D) block, the factors rebuilt from their eigenpairs
        back = torch.empty_like(u)
        for (m, w_off, b_off), (Ua, la, Ug, lg, count) in zip(C._layers(net), post.data):
            o, nw = m.weight.shape[0], m.weight[0].numel()
            blk = torch.cat([u[:, w_off:w_off + o * nw].reshape(len(u), o, nw), u[:, b_off:b_off + o, None]], 2)
            G, Am = Ug @ torch.diag(lg) @ Ug.T, Ua @ torch.diag(la) @ Ua.T
            blk = G @ blk @ Am / count + post.delta * blk
            back[:, w_off:w_off + o * nw] = blk[:, :, :nw].reshape(len(u), -1)
            back[:, b_off:b_off + o] = blk[:, :, nw]
    torch.testing.assert_close(back, v, rtol=1e-8, atol=1e-8)


def test_mpe_scores_predict_brute_force_leave_one_out():
    """Softmax regression with a prior, fitted to convergence: the MPE (full GGN) predicts every retrain's change of
    every test loss; the correlation is near one and the scale right (a first-order estimate: the leverage of an
    example, about P/N = 21/300 here, is its error's scale)."""
    x, y, xt, yt = _toy(n=300)
    delta = 1.0
    net = _fit(x, y, delta)
    S = A.mpe_scores(net, x.double(), y, xt.double(), yt, posterior="full", delta=delta)
    base = F.cross_entropy(net(xt.double()), yt, reduction="none").detach()
    truth = []
    for i in range(len(x)):
        keep = torch.arange(len(x)) != i
        truth.append(F.cross_entropy(_fit(x[keep], y[keep], delta)(xt.double()), yt, reduction="none").detach() - base)
    truth = torch.stack(truth)
    r = A.per_test_correlations(S, (truth, torch.arange(len(x))), "loo")
    assert r.mean() > 0.98 and r.min() > 0.95
    slope = (S * truth).sum() / (S * S).sum()
    assert 0.8 < slope < 1.25


def test_correlations_by_hand():
    g = torch.Generator().manual_seed(0)
    S = torch.randn(30, 4, generator=g, dtype=torch.float64)
    idx = torch.tensor([3, 7, 8, 20])
    r = A.per_test_correlations(S, (2 * S[idx] + 1, idx), "loo")  # an exact affine truth
    np.testing.assert_allclose(r, 1.0)
    subsets = A.lds_subsets(30, 12, 0.5, seed=1)
    assert subsets.shape == (12, 15) and all(len(set(s.tolist())) == 15 for s in subsets)
    loss = torch.stack([-(S[s].sum(0)) ** 3 for s in subsets])  # any increasing map of the predicted loss
    np.testing.assert_allclose(A.per_test_correlations(S, (loss, subsets), "lds"), 1.0)
    np.testing.assert_allclose(A.per_test_correlations(-S, (loss, subsets), "lds"), -1.0)
    est = A.evaluate(S, (2 * S[idx] + 1, idx), "loo")
    assert est.lo <= est.value <= est.hi and abs(est.value - 1) < 1e-12


def test_truth_agreement_by_hand():
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0], [3.0, 5.0]])
    b = torch.tensor([[2.0, 0.0], [4.0, 3.0], [6.0, 1.0]])
    np.testing.assert_allclose(A.truth_agreement(a, b, "loo"), [1.0, np.corrcoef(a[:, 1], b[:, 1])[0, 1]])
    np.testing.assert_allclose(A.truth_agreement(a, b ** 3, "lds"), [1.0, -0.5])  # ranks (2, 1, 3) and (1, 3, 2)
    with pytest.raises(ValueError, match="unknown kind"):
        A.truth_agreement(a, b, "auc")


def test_ground_truth_keeps_the_order():
    base = A.base_spec({"name": "digits"}, {"name": "softmax_regression"}, {"epochs": 1, "lr": 0.1, "shuffle": False})
    perm = A.order(10, seed=3)
    spec = A._without(base, perm, [perm[4], perm[0]])
    assert spec["kept"] == [i for i in perm if i not in (perm[4], perm[0])]
    with pytest.raises(ValueError, match="fixed order"):
        A.base_spec({"name": "digits"}, {"name": "softmax_regression"}, {"epochs": 1, "lr": 0.1})
    with pytest.raises(ValueError, match="unknown method"):
        A.scores("loo", None, None, None, None, None)


def test_loo_truth_is_the_difference_of_retrains(tmp_path):
    """The jobs' results against one retrain by hand: training on the order without i, the same seed and recipe."""
    from mpe.data import from_spec

    recipe = {"epochs": 2, "lr": 0.05, "batch_size": 32, "shuffle": False, "momentum": 0.0, "schedule": "constant"}
    base = A.base_spec({"name": "digits", "n_train": 200, "n_test": 50, "seed": 0}, {"name": "softmax_regression"},
                       recipe)
    data = from_spec(base["data"])
    perm = A.order(200, seed=1)
    delta_loss, removed = A.loo_truth(base, perm, [5], tmp_path, progress=False)

    def loss_without(drop):
        idx = torch.tensor([i for i in perm if i not in drop])
        net = get_model("softmax_regression", data.shape, data.n_classes, seed=0)
        train(net, data.x_train[idx], data.y_train[idx], seed=0, **recipe)
        return F.cross_entropy(net(data.x_test).double(), data.y_test, reduction="none").detach()

    torch.testing.assert_close(delta_loss[0], loss_without({5}) - loss_without(set()), rtol=1e-4, atol=1e-6)
    ref = A.reference_models(base, [perm], tmp_path)[0]
    torch.testing.assert_close(F.cross_entropy(ref(data.x_test).double(), data.y_test, reduction="none"),
                               loss_without(set()), rtol=1e-5, atol=1e-6)


def test_dynamics_scores_retrace_the_reference_run(tmp_path):
    """Forgetting events, misclassified visits and EL2N against one run by hand in the same order, recorded by hand,
    and mapped from run positions back to training examples; read from the reference model's run, not trained again."""
    from mpe.data import from_spec
    from mpe.train import el2n

    recipe = {"epochs": 4, "lr": 0.5, "batch_size": 16, "shuffle": False, "momentum": 0.0, "schedule": "constant"}
    base = A.base_spec({"name": "digits", "n_train": 120, "n_test": 20, "seed": 0}, {"name": "softmax_regression"},
                       recipe)
    data = from_spec(base["data"])
    perm = A.order(120, seed=2)
    ref = A.reference_models(base, [perm], tmp_path)[0]
    runs = sorted(tmp_path.glob("*.pt"))
    got = A.dynamics_scores(base, perm, el2n_epochs=2, cache=tmp_path)
    assert sorted(tmp_path.glob("*.pt")) == runs == runs[:1]  # one training serves the model and its dynamics
    x, y = data.x_train[perm], data.y_train[perm]
    net = get_model("softmax_regression", data.shape, data.n_classes, seed=0)
    right, err = torch.zeros(4, 120), torch.zeros(4, 120)

    class Record:  # position k of the run is example perm[k]
        def on_batch_end(self, state, idx, logits, yb):
            right[state.epoch, torch.as_tensor(perm)[idx]] = (logits.argmax(1) == yb).float()
            err[state.epoch, torch.as_tensor(perm)[idx]] = el2n(logits.detach(), yb)

    train(net, x, y, seed=0, callbacks=[Record()], **recipe)
    torch.testing.assert_close(flat_params(ref), flat_params(net))
    events = ((right[:-1] == 1) & (right[1:] == 0)).sum(0).double()
    never = right.sum(0) == 0
    torch.testing.assert_close(got["forgetting"], torch.where(never, 4.0, events).double())
    torch.testing.assert_close(got["cbtl"], (4 - right.sum(0)).double())
    torch.testing.assert_close(got["el2n"], err[1].double(), rtol=1e-5, atol=1e-6)
    assert 0 < got["cbtl"].mean() < 4  # some examples are learned, some are not: the test can see a mix-up
    with pytest.raises(ValueError, match="el2n_epochs"):
        A.dynamics_scores(base, perm, el2n_epochs=5, cache=tmp_path)


def test_against_dattri():
    """dattri's metrics equal ours; its explicit influence function equals the MPE with the full GGN where the
    Hessian is the GGN (softmax regression) and its regularisation is our prior on the mean-loss scale."""
    metrics = pytest.importorskip("dattri.metric")
    g = torch.Generator().manual_seed(0)
    S = torch.randn(40, 5, generator=g)
    idx = torch.arange(0, 40, 3)
    truth = S[idx] + 0.5 * torch.randn(len(idx), 5, generator=g)
    np.testing.assert_allclose(A.per_test_correlations(S, (truth, idx), "loo"),
                               metrics.loo_corr(S[idx], (truth, idx))[0].numpy(), rtol=1e-5)
    subsets = A.lds_subsets(40, 20, 0.5)
    loss = torch.stack([-S[s].sum(0) for s in subsets]) + 0.3 * torch.randn(20, 5, generator=g)
    np.testing.assert_allclose(A.per_test_correlations(S, (loss, subsets), "lds"),
                               metrics.lds(-S, (loss, subsets))[0].numpy(), rtol=1e-5)

    x, y, xt, yt = _toy()
    delta = 1.0
    net = _fit(x, y, delta)
    ours = A.mpe_scores(net, x.double(), y, xt.double(), yt, posterior="full", delta=delta)
    theirs, _ = A.scores("if-explicit", net, x.double(), y, xt.double(), yt, regularization=delta / len(x),
                         batch_size=len(x))
    np.testing.assert_allclose(theirs.numpy() / len(x), ours.numpy(), rtol=1e-4, atol=1e-8)


def test_influence_functions_solve_each_test_example_once(monkeypatch):
    """dattri solves a test batch's inverse-Hessian products once per training batch: the training set goes in as one
    batch, the test examples in batches of test_batch_size, and the scores do not depend on either."""
    algorithm = pytest.importorskip("dattri.algorithm")
    x, y, xt, yt = _toy()
    net = _fit(x, y, 1.0).double()
    solves = []
    solve = algorithm.IFAttributorCG.transform_test_rep
    monkeypatch.setattr(algorithm.IFAttributorCG, "transform_test_rep",
                        lambda self, ckpt_idx, test_rep: solves.append(len(test_rep)) or solve(self, ckpt_idx, test_rep))
    S = {b: A.dattri_scores("if-cg", net, x.double(), y, xt.double(), yt, regularization=0.1, batch_size=7,
                            test_batch_size=b) for b in (2, len(xt))}
    assert solves == [2] * (len(xt) // 2) + [len(xt) % 2] * (len(xt) % 2) + [len(xt)]
    torch.testing.assert_close(S[2], S[len(xt)], rtol=1e-6, atol=1e-9)


def test_grad_dot_projects_to_proj_dim():
    """dattri's Grad-Dot is ∇ℓ_iᵀ∇ℓ_j after a random projection to proj_dim directions: close to the exact inner
    product with many directions, far from it with few (so proj_dim reaches dattri's projector)."""
    pytest.importorskip("dattri")
    x, y, xt, yt = _toy()
    net = _fit(x, y, 1.0).float()
    exact = (C.per_example_grads(net, x, y) @ C.per_example_grads(net, xt, yt).T).numpy().ravel()
    r = {d: np.corrcoef(A.scores("grad-dot", net, x, y, xt, yt, proj_dim=d)[0].numpy().ravel(), exact)[0, 1]
         for d in (4, 4096)}
    assert r[4096] > 0.98 and r[4] < 0.9, r


def test_readme_example_runs():
    """The README's ten-line example of scoring one's own model is code that runs."""
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### Comparison", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["S"].shape == (300, 50) and torch.isfinite(namespace["S"]).all()


def test_self_scores():
    """Grad-Dot's self score is ‖∇ℓ_i‖² up to dattri's random projection (its code, checked by hand); the MPE
    self-influence is ∇ℓ_iᵀ S⁻¹ ∇ℓ_i with the K-FAC precision; the loss is the loss."""
    x, y, _, _ = _toy(n=40)
    net = _fit(x, y, 1.0)
    x = x.double()
    g = C.per_example_grads(net, x, y)
    loss, _ = A.self_scores("loss", net, x, y)
    torch.testing.assert_close(loss, F.cross_entropy(net(x), y, reduction="none").detach())
    mine, _ = A.self_scores("mpe-self", net, x, y, delta=1.0)
    post = C.laplace_posterior("kfac", net, x, 1.0)
    torch.testing.assert_close(mine, (g * A.posterior_solve(net, post, g)).sum(1))
    with pytest.raises(ValueError, match="unknown self score"):
        A.self_scores("el2n", net, x, y)
    with pytest.raises(ValueError, match="needs the prior precision"):
        A.self_scores("mpe-self", net, x, y)
    pytest.importorskip("dattri")
    dot, _ = A.self_scores("grad-dot", net, x, y)  # dattri projects the gradients to 512 random directions first
    r = np.corrcoef(dot.numpy(), (g * g).sum(1).numpy())[0, 1]
    assert r > 0.95, r
    trak, _ = A.self_scores("trak", net, x, y)
    assert trak.shape == (len(x),)  # dattri's own is (N, 1)


def test_trak_ensemble_is_symmetric_in_its_checkpoints_and_leaves_them_unchanged():
    """TRAK-k averages over its checkpoints, so their order cannot matter; dattri loads each checkpoint into the first
    model in place, so a checkpoint sharing that model's tensors would be overwritten (train and test gradients of
    one checkpoint then come from different models) and the scores would depend on the order."""
    pytest.importorskip("dattri")
    x, y, xt, yt = _toy()
    nets = [_fit(x, y, 1.0).float(), _fit(x, y, 1.0, seed=1).float()]
    with torch.no_grad():
        nets[1][-1].weight.mul_(-0.5)  # a second checkpoint unlike the first
    before = [flat_params(n).clone() for n in nets]
    ab, _ = A.scores("trak", nets, x, y, xt, yt)
    ba, _ = A.scores("trak", nets[::-1], x, y, xt, yt)
    assert all(torch.equal(flat_params(n), b) for n, b in zip(nets, before))
    torch.testing.assert_close(ab, ba, rtol=1e-3, atol=1e-6)


def test_pbrf_scores_are_the_mpe_to_first_order_and_only_for_their_rows():
    """With the full-data KL as data term, the PBRF of up-weighting i by ε moves θ by ε (G/N + λ)⁻¹ g_i to first
    order, so that per example's weight it is the MPE with the full GGN and δ = λN (a convex model, so the solves
    converge): equal at a small ε, close at one example's weight ε = 1/N. Rows not asked for are NaN, and so is any
    LDS that needs them."""
    x, y, xt, yt = _toy(n=80)
    damping = 0.05
    net = _fit(x, y, damping * len(x))
    rows = [0, 3, 7, 11]
    want = A.mpe_scores(net, x.double(), y, xt.double(), yt, posterior="full", delta=damping * len(x))[rows]
    small = A.pbrf_scores(net, x, y, xt, yt, damping=damping, rows=rows, eps=1e-4)
    assert ((small[rows] - want).norm() / want.norm()).item() < 0.02  # the diagonal GGN's MPE is 49 % off
    got = A.pbrf_scores(net, x, y, xt, yt, damping=damping, rows=rows)
    assert torch.isnan(got[[i for i in range(len(x)) if i not in rows]]).all()
    assert np.corrcoef(got[rows].ravel(), want.ravel())[0, 1] > 0.99  # second order at ε = 1/80: a few per cent
    subsets = A.lds_subsets(len(x), 10, 0.5)
    assert np.isnan(A.per_test_correlations(got, (torch.randn(10, len(xt)), subsets), "lds")).all()
