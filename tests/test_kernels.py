"""lpNTK kernels against explicit eNTK contractions, Eq. 1 against a real SGD step, FPC on the official toy case."""
import pytest
import torch
from torch import nn

from mpe.kernels import (count_sketch, delta_q, entk_blocks, features, fpc, gram, kernel_statistics, signs,
                         two_layer_relu_entk)
from mpe.train import flat_params, set_flat_params


def tiny_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).double()


def test_feature_gram_equals_sign_contraction_of_the_entk(f64):
    net = tiny_net()
    x, y = torch.randn(7, 1, 2, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    theta = entk_blocks(net, x, x)  # (7, 7, 4, 4)
    for kind in ("lpntk", "pntk"):
        s = signs(y, 4, kind).double()
        want = torch.einsum("ak,abkl,bl->ab", s, theta, s)
        phi = features(net, x, y, kind, chunk=3)
        torch.testing.assert_close(gram(phi, block=2), want)
        assert torch.linalg.eigvalsh(gram(phi)).min() > -1e-9  # PSD
    torch.testing.assert_close(gram(features(net, x, y, scale=0.25)), 0.25 * gram(features(net, x, y)))
    assert signs(torch.tensor([2]), 4).tolist() == [[-1.0, -1.0, 1.0, -1.0]]
    with pytest.raises(ValueError, match="valid choices: lpntk, pntk"):
        signs(y, 4, "entk")


def test_sketched_features_are_the_count_sketch_of_the_exact_ones(f64):
    net = tiny_net()
    x, y = torch.randn(7, 1, 2, 3), torch.tensor([0, 1, 2, 3, 0, 1, 2])
    phi = features(net, x, y)  # (7, P), P = 59
    bucket, sign = count_sketch(phi.shape[1], 8, seed=3)
    S = torch.zeros(8, phi.shape[1], dtype=phi.dtype)
    S[bucket, torch.arange(phi.shape[1])] = sign.double()  # the explicit sketch matrix, one ±1 per column
    torch.testing.assert_close(features(net, x, y, chunk=3, sketch=8, seed=3), phi @ S.T)
    # unbiased inner products: the mean Gram over many sketches approaches the exact one (error ~ 1/sqrt(#sketches))
    mean = sum(gram(features(net, x, y, sketch=16, seed=s)) for s in range(400)) / 400
    exact = gram(phi)
    assert (mean - exact).abs().max() < 0.1 * exact.abs().max()
    assert (gram(features(net, x, y, sketch=16, seed=0)) - exact).abs().max() > 1e-3  # a single sketch is not exact
    with pytest.raises(ValueError, match="positive"):
        count_sketch(10, 0)


def test_eq1_predicts_the_change_of_one_plain_sgd_step(f64):
    net = tiny_net()
    g = torch.Generator().manual_seed(1)
    x_o, x_b = torch.randn(5, 1, 2, 3, generator=g), torch.randn(8, 1, 2, 3, generator=g)
    y_b = torch.randint(0, 4, (8,), generator=g)
    lr = 1e-3
    before = torch.softmax(net(x_o), 1).detach()
    pred = delta_q(net, x_o, x_b, y_b, lr)
    theta = flat_params(net)
    net.zero_grad()
    nn.functional.cross_entropy(net(x_b), y_b).backward()
    set_flat_params(net, theta - lr * torch.cat([p.grad.reshape(-1) for p in net.parameters()]))
    true = torch.softmax(net(x_o), 1).detach() - before
    assert (pred - true).abs().max() < 1e-3 * true.abs().max()  # first order: error O(lr²)
    # the JVP route equals the explicit eNTK form of Eq. 1
    set_flat_params(net, theta)
    q_o, q_b = torch.softmax(net(x_o), 1).detach(), torch.softmax(net(x_b), 1).detach()
    A = torch.diag_embed(q_o) - q_o.unsqueeze(2) * q_o.unsqueeze(1)
    err = nn.functional.one_hot(y_b, 4).double() - q_b
    explicit = lr * torch.einsum("okl,obln,bn->ok", A, entk_blocks(net, x_o, x_b), err) / len(x_b)
    torch.testing.assert_close(pred, explicit)


def test_two_layer_closed_form_matches_autograd(f64):
    n, d, K, N = 7, 3, 4, 5
    g = torch.Generator().manual_seed(0)
    W1, W2, X = torch.randn(n, d, generator=g), torch.randn(K, n, generator=g), torch.randn(N, d, generator=g)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.W1, self.W2 = nn.Parameter(W1.clone()), nn.Parameter(W2.clone())

        def forward(self, x):
            return torch.relu(x.flatten(1) @ self.W1.T / d ** 0.5) @ self.W2.T / n ** 0.5

    torch.testing.assert_close(two_layer_relu_entk(X, W1, W2), entk_blocks(Net(), X, X))


def test_fpc_reproduces_the_official_toy_case():
    pairs = [(0, 0, 30), (0, 1, 25), (3, 3, 24), (2, 2, 23), (1, 1, 22), (2, 3, 18), (0, 2, 15), (0, 3, 15), (1, 2, 12),
             (1, 3, 10)]
    sim = torch.zeros(4, 4)
    for i, j, k in pairs:
        sim[i, j] = sim[j, i] = k
    assert fpc(sim, 2) == [(0, [0, 1]), (3, [3, 2])]
    assert sorted(h for h, _ in fpc(sim, 4, selfmax_guard=False)) == [0, 1, 2, 3]
    # the guard: only examples 0, 2, 3 are their own row maximum; with 3 clusters they come back as singletons
    assert fpc(sim, 3) == [(0, [0]), (2, [2]), (3, [3])]
    with pytest.raises(ValueError, match="n_clusters"):
        fpc(sim, 5)


def test_blockwise_kernel_statistics_equal_the_full_kernel_ones():
    """kernel_statistics (row blocks, no N×N kernel) against the statistics of the full Gram matrix, brute force."""
    g = torch.Generator().manual_seed(0)
    n, t, k = 53, 0.5, 4
    phi, y = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)
    K = phi @ phi.T
    iu = torch.triu_indices(n, n)
    pairs = K[iu[0], iu[1]]
    off = K.clone().fill_diagonal_(-float("inf"))
    s = kernel_statistics(phi, y, zero_threshold=t, top_k=k, block=7)
    assert torch.allclose(s["pairs"], pairs)  # row-major order; blocks round differently in the last bit
    assert s["positive"] == pytest.approx((pairs > t).double().mean().item())
    assert s["negative"] == pytest.approx((pairs < -t).double().mean().item())
    assert s["zero"] == pytest.approx((pairs.abs() <= t).double().mean().item())
    assert torch.equal(s["selfmax_full"], K.diagonal() >= K.max(1).values)
    assert torch.equal(s["selfmax_upper"], K.diagonal() >= torch.triu(K).masked_fill(
        torch.ones(n, n, dtype=torch.bool).tril(-1), -float("inf")).max(1).values)
    without_self = K.clone().fill_diagonal_(float("nan"))
    assert torch.allclose(s["negative_per_example"], (without_self < -t).double().sum(1) / (n - 1))
    s_neg = kernel_statistics(phi, y, zero_threshold=-1e9, top_k=k, block=7)  # every partner counts as negative
    assert torch.allclose(s_neg["negative_per_example"], torch.ones(n, dtype=torch.float64))
    assert s["same_class_top_k"] == pytest.approx((y[off.topk(k, 1).indices] == y[:, None]).double().mean().item())
    sub = kernel_statistics(phi, y, zero_threshold=t, top_k=k, block=7, max_pairs=300)
    assert 200 < len(sub["pairs"]) < 400 and torch.isin(sub["pairs"].round(decimals=6), pairs.round(decimals=6)).all()


class _LargestTensor(torch.overrides.TorchFunctionMode):
    """Records the largest tensor any torch call returns (numel): a deterministic stand-in for peak memory."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_sketched_entk_blocks_are_the_count_sketch_of_the_jacobians(f64):
    from mpe.curvature import jacobians

    net = tiny_net()
    g = torch.Generator().manual_seed(1)
    xa, xb = torch.randn(5, 1, 2, 3, generator=g), torch.randn(3, 1, 2, 3, generator=g)
    (_, Ja), = jacobians(net, xa)
    (_, Jb), = jacobians(net, xb)  # (n, K, P)
    bucket, sign = count_sketch(Ja.shape[2], 8, seed=3)
    S = torch.zeros(8, Ja.shape[2], dtype=Ja.dtype)
    S[bucket, torch.arange(Ja.shape[2])] = sign.double()  # the explicit sketch matrix
    expected = torch.einsum("akp,blp->abkl", Ja @ S.T, Jb @ S.T)
    torch.testing.assert_close(entk_blocks(net, xa, xb, chunk=2, sketch=8, seed=3), expected)
    exact = entk_blocks(net, xa, xb)
    mean = sum(entk_blocks(net, xa, xb, sketch=16, seed=s) for s in range(400)) / 400  # unbiased entries
    assert (mean - exact).abs().max() < 0.1 * exact.abs().max()
    assert (entk_blocks(net, xa, xb, sketch=16, seed=0) - exact).abs().max() > 1e-3  # one sketch is not exact
    same = entk_blocks(net, xa, xa, sketch=8, seed=3)
    torch.testing.assert_close(same, same.permute(1, 0, 3, 2))  # Θ(a, b) = Θ(b, a)ᵀ, from one sketch of x_a


def test_big_routes_never_form_the_full_kernel_or_all_jacobians():
    """kernel_statistics holds one (block, N) slice of the kernel, never N×N; entk_blocks in chunks holds the Jacobians
    of 2 chunks, never all of them, and gives the same blocks."""
    g = torch.Generator().manual_seed(0)
    n = 400
    phi, y = torch.randn(n, 16, generator=g), torch.randint(0, 10, (n,), generator=g)
    with _LargestTensor() as rec:
        kernel_statistics(phi, y, zero_threshold=0.1, top_k=5, block=25, max_pairs=1000)
    assert rec.largest <= 25 * n  # a row block of the kernel (the full kernel would be 400 × 400)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    xa, xb = torch.randn(9, 6, generator=g), torch.randn(5, 6, generator=g)
    p = sum(q.numel() for q in net.parameters())
    with _LargestTensor() as rec:
        chunked = entk_blocks(net, xa, xb, chunk=2)
    assert rec.largest < 9 * 3 * p  # never all Jacobians of x_a at once (9·K·P)
    with _LargestTensor() as rec:
        whole = entk_blocks(net, xa, xb)
    assert rec.largest >= 9 * 3 * p  # one chunk: the measure sees them
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(entk_blocks(net, xa, xa, chunk=4), entk_blocks(net, xa, xa))
