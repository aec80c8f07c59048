"""FSD and its approximations against independent truth: torch.func.jvp for the linearised network, exactness cases
of LAFTR, Monte Carlo for the Bernoulli closed form, the Fisher as the second-order term of the KL, memory counts."""
import copy

import pytest
import torch
from torch import nn

from mpe import fsd


def perturbed(m0, scale):
    """A copy of m0 with Gaussian noise of standard deviation ``scale`` added to every parameter."""
    m1 = copy.deepcopy(m0)
    with torch.no_grad():
        for p in m1.parameters():
            p.add_(scale * torch.randn_like(p))
    return m1


def pair(sizes=(5, 8, 6, 3), scale=0.3, seed=0, relu=True):
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU() if relu else nn.Identity())
    m0 = nn.Sequential(nn.Flatten(), *layers).double()
    return m0, perturbed(m0, scale)


def test_rho_by_hand():
    y0, y1 = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, -1.0]])
    p1 = torch.softmax(y1, 1)
    assert fsd.rho(y0, y1, "euclidean").item() == pytest.approx(1.0)
    assert fsd.rho(y0, y1, "kl").item() == pytest.approx(float(0.5 * (torch.log(0.5 / p1)).sum()))
    assert fsd.rho(y0, y1, "softmax_l2").item() == pytest.approx(float(0.5 * ((p1 - 0.5) ** 2).sum()))
    with pytest.raises(ValueError, match="valid choices"):
        fsd.rho(y0, y1, "l1")


def test_ntk_is_the_jvp_linearisation():
    m0, m1 = pair()
    x = torch.randn(40, 5, dtype=torch.float64)
    params0 = dict(m0.named_parameters())
    tangent = {n: p1.detach() - p0.detach() for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters())}
    y0, jdelta = torch.func.jvp(lambda p: torch.func.functional_call(m0, p, (x,)), (params0,), (tangent,))
    for metric in fsd.METRICS:
        want = fsd.rho(y0, y0 + jdelta, metric).mean()
        torch.testing.assert_close(fsd.ntk(m0, m1, x, metric), want)
    want = fsd.rho(y0[:, 1:], y0[:, 1:] + jdelta[:, 1:], "kl").mean()
    torch.testing.assert_close(fsd.ntk(m0, m1, x, "kl", outputs=[1, 2]), want)


def test_laftr_is_exact_for_linear_networks_and_without_gate_flips():
    m0, m1 = pair(relu=False)
    m0 = nn.Sequential(*[m for m in m0 if not isinstance(m, nn.Identity)])
    m1 = nn.Sequential(*[m for m in m1 if not isinstance(m, nn.Identity)])
    x = torch.randn(30, 5, dtype=torch.float64)
    torch.testing.assert_close(fsd.laftr(m0, m1, x, "kl"), fsd.fsd(m0, m1, x, "kl"))  # a deep linear network
    with pytest.raises(NotImplementedError, match="Tanh"):
        fsd.laftr(nn.Sequential(nn.Linear(5, 3), nn.Tanh()), nn.Sequential(nn.Linear(5, 3), nn.Tanh()), x)
    # a tiny perturbation flips no gate: LAFTR equals the true FSD (the NTK does not: it drops ΔW Δa)
    m0, m1 = pair(scale=1e-4)
    torch.testing.assert_close(fsd.laftr(m0, m1, x, "euclidean"), fsd.fsd(m0, m1, x, "euclidean"), rtol=1e-9, atol=0)


def test_laftr_tracks_large_changes_better_than_the_ntk():
    m0, m1 = pair(sizes=(20, 64, 64, 5), scale=0.15, seed=1)
    x = torch.randn(2000, 20, dtype=torch.float64)
    true = fsd.fsd(m0, m1, x, "euclidean")
    assert abs(fsd.laftr(m0, m1, x, "euclidean") / true - 1) < abs(fsd.ntk(m0, m1, x, "euclidean") / true - 1)


def test_bernoulli_closed_form_matches_monte_carlo():
    m0, m1 = pair(scale=0.2)
    data = torch.randn(500, 5, dtype=torch.float64) @ torch.randn(5, 5, dtype=torch.float64) + 0.5
    probs = fsd.unit_probs(m0, data)
    mu, cov = fsd.input_gaussian(data)
    exact = fsd.laftr_bernoulli_exact(m0, m1, probs, mu, cov)
    g = torch.Generator().manual_seed(0)
    x = torch.distributions.MultivariateNormal(mu, cov).sample((200_000,))
    with torch.no_grad():
        mc = torch.stack([fsd.laftr_bernoulli(m0, m1, probs, x[i::4], "euclidean", generator=g) for i in range(4)])
    assert abs(mc.mean() / exact - 1) < 4 * mc.std() / exact / 2 + 0.01
    # with gates that are always on the network is linear, and the FSD of two linear maps is a quadratic form
    ones = [torch.ones_like(p) for p in probs]
    with torch.no_grad():
        mc1 = fsd.laftr_bernoulli(m0, m1, ones, x, "euclidean")
    torch.testing.assert_close(fsd.laftr_bernoulli_exact(m0, m1, ones, mu, cov), mc1, rtol=0.02, atol=0)


def test_unit_probs_and_input_gaussian():
    m0, _ = pair()
    x = torch.randn(100, 5, dtype=torch.float64)
    s = m0[1](x)
    torch.testing.assert_close(fsd.unit_probs(m0, x)[0], (s >= 0).double().mean(0).float())
    mu, cov = fsd.input_gaussian(x, jitter=0.0)
    torch.testing.assert_close(cov, torch.cov(x.T, correction=0))


def test_quadratic_forms_are_the_second_order_term_of_the_kl():
    from mpe.curvature import ggn_full

    m0, m1 = pair(sizes=(4, 6, 3), scale=1.0)
    x = torch.randn(25, 4, dtype=torch.float64)
    v = torch.cat([(p1 - p0).detach().reshape(-1) for p0, p1 in zip(m0.parameters(), m1.parameters())])
    G = ggn_full(m0, x) / len(x)
    eps = 1e-3
    small = copy.deepcopy(m0)
    with torch.no_grad():
        for p0, p1, ps in zip(m0.parameters(), m1.parameters(), small.parameters()):
            ps.copy_(p0 + eps * (p1 - p0))
    assert fsd.fsd(m0, small, x, "kl").item() / (eps ** 2 * 0.5 * v @ G @ v).item() == pytest.approx(1, abs=1e-2)
    torch.testing.assert_close(fsd.quadratic(m0, x, "diag")(m1), 0.5 * (torch.diag(G) * v * v).sum())
    # K-FAC is exact for one example on a single layer
    lin0, lin1 = nn.Sequential(nn.Linear(4, 3)).double(), nn.Sequential(nn.Linear(4, 3)).double()
    v1 = torch.cat([(p1 - p0).detach().reshape(-1) for p0, p1 in zip(lin0.parameters(), lin1.parameters())])
    G1 = ggn_full(lin0, x[:1])
    torch.testing.assert_close(fsd.quadratic(lin0, x[:1], "kfac")(lin1), 0.5 * v1 @ G1 @ v1)
    # one head: the Fisher of the sliced softmax
    Gh = ggn_full(fsd.Head(m0, [0, 2]), x) / len(x)
    torch.testing.assert_close(fsd.quadratic(m0, x, "diag", outputs=[0, 2])(m1), 0.5 * (torch.diag(Gh) * v * v).sum())


def test_memory_counts_match_the_notes():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    mem = fsd.memory(mlp, (1, 28, 28), n_coreset=40)
    assert mem["parameters (diagonal Fisher)"] == 669_706 and mem["K-FAC factors"] == 1_666_951
    assert mem["LAFTR Bernoulli probabilities"] == 1_024
    assert mem["Gaussian inputs (full covariance)"] == 784 + 307_720 and mem["coreset"] == 31_360


def conv_pair(scale, seed=0):
    torch.manual_seed(seed)
    m0 = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Dropout(0.3), nn.Conv2d(4, 4, 3),
                       nn.ReLU(), nn.Flatten(), nn.Linear(4, 3)).double().eval()
    return m0, perturbed(m0, scale)


def test_conv_nets_laftr_exact_without_flips_and_ntk_is_the_jvp():
    x = torch.randn(16, 2, 6, 6, dtype=torch.float64)
    m0, m1 = conv_pair(1e-5)
    torch.testing.assert_close(fsd.laftr(m0, m1, x, "euclidean"), fsd.fsd(m0, m1, x, "euclidean"), rtol=1e-8, atol=0)
    m0, m1 = conv_pair(0.3)
    params0 = dict(m0.named_parameters())
    tangent = {n: p1.detach() - p0.detach() for (n, p0), p1 in zip(m0.named_parameters(), m1.parameters())}
    y0, jd = torch.func.jvp(lambda p: torch.func.functional_call(m0, p, (x,)), (params0,), (tangent,))
    torch.testing.assert_close(fsd.ntk(m0, m1, x, "euclidean"), fsd.rho(y0, y0 + jd, "euclidean").mean())


def test_conv_unit_probs_and_bernoulli_gates():
    x = torch.randn(50, 2, 6, 6, dtype=torch.float64)
    m0, m1 = conv_pair(0.3)
    probs = fsd.unit_probs(m0, x)
    assert [tuple(p.shape) for p in probs] == [(4, 6, 6), (4, 1, 1)]
    torch.testing.assert_close(probs[0], (m0[0](x) >= 0).float().mean(0))
    assert fsd.memory(m0, (2, 6, 6))["LAFTR Bernoulli probabilities"] == 4 * 36 + 4
    # gates that copy the old network's (p = 1 where active on this one input, else 0) give LAFTR on that input
    one = x[:1]
    with torch.no_grad():
        exact = [(m0[0](one) > 0).double()[0], (m0[4](m0[2](torch.relu(m0[0](one)))) > 0).double()[0]]
    torch.testing.assert_close(fsd.laftr_bernoulli(m0, m1, exact, one, "kl"), fsd.laftr(m0, m1, one, "kl"))
