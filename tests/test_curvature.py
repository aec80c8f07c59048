"""Jacobians, GGNs, K-FAC and predictive covariances against brute force on tiny models (float64)."""
import pytest
import torch
from torch import nn

from mpe import curvature as C
from mpe.train import flat_params


def tiny_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def brute_jacobian(model, x):
    """(N, K, P) by one autograd call per example and output."""
    rows = []
    for i in range(len(x)):
        out = model(x[i:i + 1])[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[k], list(model.parameters()),
                                                                                          retain_graph=True)])
                                 for k in range(len(out))]))
    return torch.stack(rows)


def test_jacobians_match_autograd(f64):
    model, x = tiny_mlp(), torch.randn(7, 1, 2, 3)
    J = torch.cat([j for _, j in C.jacobians(model, x, chunk=3)])
    torch.testing.assert_close(J, brute_jacobian(model, x))


def tiny_cnn():  # padding, stride, a layer without bias, pooling: every case of the layer route
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2, bias=False),
                         nn.AvgPool2d(1), nn.Flatten(), nn.Linear(2, 3)).double()


def tiny_cnn_strided():  # dilation, a non-square kernel and stride, "same" reflect padding
    return nn.Sequential(nn.Conv2d(1, 2, (2, 3), stride=(1, 2), dilation=(2, 1)), nn.Tanh(),
                         nn.Conv2d(2, 3, 1, padding="same", padding_mode="reflect"), nn.Tanh(),
                         nn.Conv2d(3, 2, (3, 2)), nn.Flatten(), nn.Linear(6, 3)).double()


def tiny_normed():  # a LayerNorm: the torch.func route
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.LayerNorm(5), nn.Linear(5, 3)).double()


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn, tiny_cnn_strided, tiny_normed])
def test_per_example_grads_match_autograd(f64, make):
    shape = (5, 1, 7, 5) if make is tiny_cnn_strided else (5, 1, 2, 3)
    model, x, y = make(), torch.randn(*shape), torch.tensor([0, 2, 1, 1, 0])
    G = C.per_example_grads(model, x, y)
    for i in range(5):
        loss = nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1])
        g = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
        torch.testing.assert_close(G[i], g)


def test_ggn_equals_hessian_for_softmax_regression(f64):
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    x, y = torch.randn(9, 1, 1, 4), torch.randint(0, 3, (9,))
    theta = flat_params(model)

    def loss(t):
        W, b = t[:12].view(3, 4), t[12:]
        return nn.functional.cross_entropy(x.flatten(1) @ W.T + b, y, reduction="sum")

    H = torch.autograd.functional.hessian(loss, theta)
    torch.testing.assert_close(C.ggn_full(model, x), H)
    torch.testing.assert_close(C.ggn_diag(model, x), torch.diagonal(H))


def test_kfac_is_exact_for_one_example_and_one_layer(f64):
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 4)).double()
    x, xt = torch.randn(1, 1, 1, 5), torch.randn(6, 1, 1, 5)
    Vk = C.predictive_covariance(model, xt, C.kfac_posterior(model, x, 0.5))
    Vf = C.predictive_covariance(model, xt, C.full_posterior(model, x, 0.5))
    torch.testing.assert_close(Vk, Vf)


def test_kfac_conv_block_is_exact_for_one_position(f64):
    model = nn.Sequential(nn.Conv2d(2, 3, 4), nn.Tanh(), nn.Flatten(), nn.Linear(3, 5)).double()
    x = torch.randn(1, 2, 4, 4)
    A, G, count = C.kfac_factors(model, x)[0]
    F = C.ggn_full(model, x)
    order = [o * 32 + j for o in range(3) for j in range(32)]  # weight (out, in*k*k) rows ...
    order = [i for o in range(3) for i in order[o * 32:(o + 1) * 32] + [96 + o]]  # ... each followed by its bias
    torch.testing.assert_close(F[order][:, order], torch.kron(G, A) / count)


@pytest.mark.parametrize("padding", [dict(padding=1), dict(padding="same", padding_mode="reflect")])
def test_kfac_covariance_matches_explicit_kronecker_precision(f64, padding):
    """Conv with many positions: V from the factored code equals J P⁻¹ Jᵀ with P built explicitly."""
    model = nn.Sequential(nn.Conv2d(1, 2, 3, **padding), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 16, 3)).double()
    x, xt = torch.randn(5, 1, 4, 4), torch.randn(4, 1, 4, 4)
    post = C.kfac_posterior(model, x, 0.3)
    blocks = []
    for (m, w_off, b_off), (A, G, count) in zip(C._layers(model), C.kfac_factors(model, x)):
        out, din = m.weight.shape[0], m.weight[0].numel()
        order = [o * din + j for o in range(out) for j in range(din)]
        order = [i for o in range(out) for i in order[o * din:(o + 1) * din] + [out * din + o]]
        inv = torch.empty(len(order), len(order))
        inv[torch.tensor(order)[:, None], torch.tensor(order)[None, :]] = torch.kron(G, A) / count
        blocks.append(inv)
    P = torch.block_diag(*blocks) + 0.3 * torch.eye(sum(b.shape[0] for b in blocks))
    J = brute_jacobian(model, xt)
    torch.testing.assert_close(C.predictive_covariance(model, xt, post), J @ torch.linalg.solve(P, J.transpose(1, 2)))
    # the joint covariance of the group, cross-example blocks included
    Jf = J.reshape(-1, J.shape[2])
    Z = C.whitened_jacobians(model, xt, post).reshape(len(Jf), -1)
    torch.testing.assert_close(Z @ Z.T, Jf @ torch.linalg.solve(P, Jf.T))


def test_diag_and_full_predictive_covariance(f64):
    model, x = tiny_mlp(), torch.randn(4, 1, 2, 3)
    J = brute_jacobian(model, x)
    s = torch.rand(J.shape[2]) + 0.5
    torch.testing.assert_close(C.predictive_covariance(model, x, C.Posterior("diag", s)), (J / s) @ J.transpose(1, 2))
    S = torch.diag(s) + 0.1 * torch.ones(len(s), len(s))
    torch.testing.assert_close(C.predictive_covariance(model, x, C.Posterior("full", S)),
                               J @ torch.linalg.solve(S, J.transpose(1, 2)))
    Jf = J.reshape(-1, J.shape[2])
    for post, want in ((C.Posterior("diag", s), (Jf / s) @ Jf.T), (C.Posterior("full", S), Jf @ torch.linalg.solve(S, Jf.T))):
        Z = C.whitened_jacobians(model, x, post).reshape(len(Jf), -1)
        torch.testing.assert_close(Z @ Z.T, want)


def test_kfac_rejects_unsupported_layers():
    from mpe.models import resnet20_frn
    import pytest

    with pytest.raises(NotImplementedError, match="FRN"):
        C.kfac_posterior(resnet20_frn(), torch.randn(2, 3, 32, 32), 1.0)


def test_ivon_and_adam_variances():
    import ivon

    model = tiny_mlp().float()
    x, y = torch.randn(8, 1, 2, 3), torch.randint(0, 3, (8,))
    opt = ivon.IVON(model.parameters(), lr=0.1, ess=8, weight_decay=0.5 / 8, hess_init=0.2)
    post = C.ivon_posterior(opt)
    torch.testing.assert_close(post.data, torch.full_like(post.data, 8 * (0.2 + 0.5 / 8)))  # S = N h + δ
    adam = torch.optim.Adam(model.parameters())
    nn.functional.cross_entropy(model(x), y).backward()
    adam.step()
    v = torch.cat([adam.state[p]["exp_avg_sq"].reshape(-1) for p in model.parameters()])
    torch.testing.assert_close(C.adam_posterior(adam, 8, 0.5).data, 8 * v.sqrt() + 0.5)


def test_layer_route_equals_the_jacobians(f64):
    """ggn_diag and the diagonal-posterior covariance go layer by layer for Linear/Conv2d models: same numbers as
    the per-example Jacobians (ggn_full's diagonal; J diag(1/s) Jᵀ), with and without biases, in small chunks."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Flatten(), nn.Linear(25, 7), nn.ReLU(), nn.Linear(7, 4)),
              nn.Sequential(nn.Flatten(), nn.Linear(25, 4, bias=False)),
              nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(3, 2, 2, bias=False),
                            nn.Flatten(), nn.Linear(2, 3)),
              tiny_cnn_strided()]
    for model in models:
        model = model.double()
        assert C._layer_route(model) is not None
        x = torch.randn(11, 1, 7, 5) if model is models[-1] else torch.randn(11, 1, 5, 5)
        J = brute_jacobian(model, x)
        torch.testing.assert_close(C.ggn_diag(model, x, chunk=4), torch.diagonal(C.ggn_full(model, x)))
        s = torch.rand(J.shape[2], dtype=torch.float64) + 0.5
        torch.testing.assert_close(C.predictive_covariance(model, x, C.Posterior("diag", s), chunk=4),
                                   (J / s) @ J.transpose(1, 2))


def test_models_outside_the_layer_route_use_the_jacobians(f64):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(18, 3)).double()
    x = torch.randn(5, 1, 5, 5)
    assert C._layer_route(model) is None
    J = brute_jacobian(model, x)
    s = torch.rand(J.shape[2], dtype=torch.float64) + 0.5
    torch.testing.assert_close(C.ggn_diag(model, x), torch.diagonal(C.ggn_full(model, x)))
    torch.testing.assert_close(C.predictive_covariance(model, x, C.Posterior("diag", s)), (J / s) @ J.transpose(1, 2))
