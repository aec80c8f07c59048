"""The PBRF solver against the influence-function identity: for small ε the response is ε (H + λI)⁻¹ ∇L_m."""
import copy

import pytest
import torch
from torch import nn

from mpe import fsd
from mpe.influence import pbrf, self_influence
from mpe.train import flat_params


def test_pbrf_small_eps_is_the_damped_influence_direction():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3)).double()
    x, y = torch.randn(20, 1, 1, 3, dtype=torch.float64), torch.randint(0, 3, (20,))
    H = torch.diag(torch.rand(12, dtype=torch.float64) + 0.5)
    theta_s = flat_params(model)

    def term(net):
        d = flat_params_graph(net) - theta_s
        return 0.5 * d @ H @ d

    eps, damping = 1e-4, 0.1
    net = pbrf(model, x[:1], y[:1], term, eps=eps, damping=damping, steps=100)
    loss = nn.functional.cross_entropy(model(x[:1]), y[:1], reduction="sum")
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    want = eps * torch.linalg.solve(H + damping * torch.eye(12, dtype=torch.float64), g)
    torch.testing.assert_close(flat_params(net) - theta_s, want, rtol=5e-3, atol=1e-12)  # first order in ε
    torch.testing.assert_close(flat_params(model), theta_s)  # the trained model is untouched


def test_pbrf_of_a_confident_example_converges():
    """A confident example's gradient is small, and so are the objective's changes at eps = 1/N (here 5e-11): L-BFGS
    in theta once stopped such a solve near its start (relative error 1.0 here). Solved in its own units, it reaches
    the first-order response eps (H + lambda I)^-1 g of an ill-conditioned quadratic data term (condition number
    5e4; where the first order is exact to about 1e-4)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3)).double()
    with torch.no_grad():
        model[1].weight.zero_()
        model[1].bias.copy_(torch.tensor([10.0, 0.0, 0.0]))  # p(class 0) = 1 - 9e-5
    x, y = torch.randn(1, 1, 1, 3, dtype=torch.float64), torch.zeros(1, dtype=torch.long)
    H = torch.diag(torch.logspace(-3, 2, 12, dtype=torch.float64))
    theta_s = flat_params(model)

    def term(net):
        d = flat_params_graph(net) - theta_s
        return 0.5 * d @ H @ d

    eps, damping = 1e-3, 1e-3
    net = pbrf(model, x, y, term, eps=eps, damping=damping, steps=100)
    loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
    g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    assert 0 < g.norm() < 1e-3
    want = eps * torch.linalg.solve(H + damping * torch.eye(12, dtype=torch.float64), g)
    assert (flat_params(net) - theta_s - want).norm() < 1e-3 * want.norm()
    assert net.pbrf["grad_ratio"] < 1e-2 and not net.pbrf["diverged"]


def flat_params_graph(net):
    return torch.cat([p.reshape(-1) for p in net.parameters()])


def test_self_influence_is_positive_for_the_true_fsd_term():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(15, 1, 1, 4, dtype=torch.float64), torch.randint(0, 3, (15,))
    old = copy.deepcopy(model)
    # at damping 1e-3 these solves run away (steps of 1e9-1e20): the test once passed on such values; at damping 1
    # they converge
    report = {}
    s = self_influence(model, x[:4], y[:4], lambda i: (lambda net: fsd.fsd(old, net, x, "kl")), eps=1 / 15, steps=30,
                       damping=1.0, report=report)
    assert s.shape == (4,) and torch.all(s > 0) and not report["diverged"].any() and (report["grad_ratio"] < 1e-3).all()
    with pytest.raises(ValueError):
        pbrf(model, x[:1], y[:1], lambda net: 0.0, eps=0.0)


def test_data_terms_vanish_at_theta_s_and_are_deterministic():
    from mpe.influence import data_terms

    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x = torch.randn(30, 1, 1, 4, dtype=torch.float64)
    terms = data_terms(model, x, n_samples=200, n_subset=5)
    moved = copy.deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.2)
    with torch.no_grad():
        for name, term in terms.items():
            assert float(term(model)) == pytest.approx(0.0, abs=1e-12), name
            assert float(term(moved)) > 0 and float(term(moved)) == float(term(moved)), name
    torch.testing.assert_close(terms["true"](moved), fsd.fsd(model, moved, x, "kl"))
    with pytest.raises(ValueError, match="valid choices"):
        data_terms(model, x, ["gauss"])


def _trained_three_layer_net():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(60, 1, 1, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (60,), generator=g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                          nn.Linear(16, 3)).double()
    from mpe.train import train

    train(model, x, y, optimizer="lbfgs", epochs=100, lr=1.0, delta=1.0)
    return model, x, y


def test_quadratic_data_terms_give_the_linear_response_and_cannot_diverge():
    """With the EWC term ½ΔθᵀĜΔθ the PBRF objective is unbounded below on a three-layer net: L-BFGS runs away (the
    old solver returned self-influences of 1e62) and is now flagged as diverged (NaN). The quadratic term takes the
    linear response ε gᵀ(Ĝ + λI)⁻¹g instead, checked against Ĝ from the Jacobians (an independent route)."""
    from mpe.curvature import ggn_diag

    model, x, y = _trained_three_layer_net()
    eps, damping = 1 / 60, 1e-3
    ewc = fsd.quadratic(copy.deepcopy(model), x, "diag")
    report = {}
    s = self_influence(model, x[:10], y[:10], lambda i: ewc, eps=eps, damping=damping, steps=100, report=report)
    assert report["route"] == "linear response" and not report["diverged"].any() and torch.isfinite(s).all()
    G = ggn_diag(model, x) / len(x)
    for i in range(10):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1], reduction="sum")
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
        assert s[i].item() == pytest.approx(eps * (g * g / (G + damping)).sum().item(), rel=1e-6)
    report = {}
    runaway = self_influence(model, x[:10], y[:10], lambda i: (lambda net: ewc(net)), eps=eps, damping=damping,
                             steps=100, report=report)  # the same term without its solve: the L-BFGS route
    assert report["route"] == "L-BFGS" and report["diverged"].sum() >= 5 and runaway[report["diverged"]].isnan().all()


def test_kfac_solve_inverts_the_penalty_hessian(f64):
    """penalty.solve(v, λ) = (Ĝ + λI)⁻¹ v for the K-FAC penalty, against the dense Hessian of the penalty itself."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x = torch.randn(25, 1, 1, 4)
    penalty = fsd.quadratic(copy.deepcopy(model), x, "kfac")
    theta = flat_params(model)
    shapes = [p.shape for p in model.parameters()]

    def as_penalty(flat):
        net = copy.deepcopy(model)
        parts = torch.split(flat, [s.numel() for s in shapes])
        params = {n: t.reshape(s) for (n, _), t, s in zip(model.named_parameters(), parts, shapes)}
        return penalty(_Params(net, params))

    H = torch.autograd.functional.hessian(as_penalty, theta)
    v = torch.randn(len(theta))
    torch.testing.assert_close(penalty.solve(v, 0.3), torch.linalg.solve(H + 0.3 * torch.eye(len(theta)), v))


class _Params:
    """Stands in for a module whose parameters() are the given tensors (for a Hessian through the penalty)."""

    def __init__(self, net, params):
        self.net, self.params = net, params

    def parameters(self):
        return iter(self.params.values())


def test_lbfgs_pbrf_refuses_float32():
    """In float32 the L-BFGS solve at eps = 1/N stops near its start without any sign of failure: refused."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    x, y = torch.randn(5, 1, 1, 3), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="float64"):
        pbrf(model, x[:1], y[:1], lambda net: (net[1].weight ** 2).sum(), eps=0.2)


def test_pbrf_job_rebuilds_the_study_from_its_description(tmp_path):
    """A PBRF job described by data gives the self-influences computed from the fitted study's tensors, with ε = 1/N
    of the (flipped) training set; run_specs caches one file per job; malformed specs are errors."""
    from mpe.data import from_spec
    from mpe.influence import fitted, pbrf_job
    from mpe.retrain import run_specs

    study = dict(data=dict(name="digits", n_train=60, seed=1, flip=0.1, flip_seed=2, dtype="float64"), hidden=[8],
                 fit_iters=20, delta=1.0, terms=["true", "ewc", "subset"], n_samples=20, n_subset=10, seed=3)
    data, net, terms = fitted(study)
    assert fitted(study)[1] is net  # one fit per process
    assert next(net.parameters()).dtype == torch.float64 and torch.get_default_dtype() == torch.float32
    assert (data.y_train != from_spec(dict(name="digits", n_train=60, seed=1)).y_train).sum() == 6
    specs = [dict(study=study, term=k, examples=[0, 5, 9], damping=1e-3, steps=5) for k in ("subset", "ewc")]
    got = run_specs(pbrf_job, specs, tmp_path, progress=False)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    torch.set_default_dtype(torch.float64)
    try:
        idx = torch.tensor([0, 5, 9])
        for spec, out in zip(specs, got):
            want = self_influence(net, data.x_train[idx], data.y_train[idx], lambda i: terms[spec["term"]], eps=1 / 60,
                                  damping=1e-3, steps=5)
            torch.testing.assert_close(out["influence"], want, rtol=0, atol=0, equal_nan=True)
    finally:
        torch.set_default_dtype(torch.float32)
    assert got[1]["route"] == "linear response" and got[0]["route"] == "L-BFGS"
    with pytest.raises(ValueError, match="not one of the study's terms"):
        pbrf_job(dict(specs[0], term="kfac"))
    with pytest.raises(ValueError, match="float64"):
        fitted(dict(study, data=dict(name="digits", n_train=60)))
    with pytest.raises(ValueError, match="unknown \\['lr'\\]"):
        fitted(dict(study, lr=1.0))
