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


def flat_params_graph(net):
    return torch.cat([p.reshape(-1) for p in net.parameters()])


def test_self_influence_is_positive_for_the_true_fsd_term():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(15, 1, 1, 4, dtype=torch.float64), torch.randint(0, 3, (15,))
    old = copy.deepcopy(model)
    s = self_influence(model, x[:4], y[:4], lambda i: (lambda net: fsd.fsd(old, net, x, "kl")), eps=1 / 15, steps=30)
    assert s.shape == (4,) and torch.all(s > 0)
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
