r"""Sample-interaction kernels of the lpNTK paper: eNTK blocks, pNTK, lpNTK, the one-step interaction (Eq. 1) and
farthest-point clustering.

Notation: logits z(x) ∈ R^K, q = softmax(z), J(x) = ∂z/∂w ∈ R^{K×P}, eNTK block Θ(x, x') = J(x) J(x')ᵀ (K×K).

    lpNTK   κ((x,y),(x',y')) = c · s(y)ᵀ Θ(x,x') s(y'),   s(y) = 2e_y − 1 (+1 at the label, −1 elsewhere)   (Eq. 2)
    pNTK    the same with s = 1 (Mohamadi et al. 2023)

Both are inner products of feature maps, φ(x, y) = √c · ∇_w[s(y)ᵀ z(x)]: one backward pass per example instead of K
(:func:`features`), and the kernel is the Gram matrix of φ (:func:`gram`, in blocks). The scale c is 1 in the
official code (and here by default); the paper probably uses 1/K. Features are computed with the model in eval mode
(dropout off), as the official code does.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

from .curvature import _functional, jacobians

__all__ = ["KINDS", "signs", "count_sketch", "features", "gram", "kernel_statistics", "entk_blocks", "delta_q",
           "two_layer_relu_entk", "fpc"]

KINDS = ("lpntk", "pntk")


def signs(y: torch.Tensor, n_classes: int, kind: str = "lpntk") -> torch.Tensor:
    """s(y) (N, K): 2·onehot(y) − 1 for lpNTK, all ones for pNTK."""
    if kind not in KINDS:
        raise ValueError(f"unknown kernel {kind!r}; valid choices: {', '.join(KINDS)}")
    if kind == "pntk":
        return torch.ones(len(y), n_classes)
    return 2.0 * F.one_hot(y.long(), n_classes).float() - 1.0


def count_sketch(n_in: int, n_out: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A seeded count sketch S: R^{n_in} → R^{n_out}: bucket h(i) (n_in,) uniform in [0, n_out) and sign σ(i) (n_in,)
    uniform in {±1}, (Sv)_b = Σ_{i: h(i)=b} σ(i) v_i. Inner products are unbiased, E⟨Sa, Sb⟩ = ⟨a, b⟩, with
    variance at most 2‖a‖²‖b‖²/n_out (Charikar et al. 2002); storing S costs O(n_in), not O(n_in · n_out)."""
    if n_in < 1 or n_out < 1:
        raise ValueError(f"need positive dimensions, got n_in={n_in}, n_out={n_out}")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, n_out, (n_in,), generator=g), torch.randint(0, 2, (n_in,), generator=g) * 2.0 - 1.0


def _apply_sketch(v: torch.Tensor, bucket: torch.Tensor, sign: torch.Tensor, n_out: int) -> torch.Tensor:
    """The :func:`count_sketch` (bucket, sign) applied along the last dimension of v (..., n_in) -> (..., n_out)."""
    return v.new_zeros(*v.shape[:-1], n_out).index_add_(v.dim() - 1, bucket, v * sign.to(v.dtype))


def features(model, x: torch.Tensor, y: torch.Tensor, kind: str = "lpntk", scale: float = 1.0,
             chunk: int = 256, sketch: int | None = None, seed: int = 0) -> torch.Tensor:
    """φ(x_n, y_n) = √scale · ∇_w[s(y_n)ᵀ z(x_n)] for every example, (N, P), in ``model.parameters()`` order.

    ``sketch=p`` returns S φ (N, p) instead, with S the :func:`count_sketch` of ``seed``, applied chunk by chunk so
    that the (N, P) matrix never exists: the lpNTK of a ResNet-18 (P ≈ 11.2M) over 50,000 images would need 2.2 TB.
    Gram entries are then unbiased with a relative error of order √(2/p) (a deviation from the official exact kernel).
    """
    f, params, names = _functional(model)  # f(params, one example) -> logits (K,)
    device = next(model.parameters()).device
    if sketch is not None:
        bucket, sign = (t.to(device) for t in count_sketch(sum(p.numel() for p in params.values()), sketch, seed))

    def signed_sum(prm, x1, s1):
        return f(prm, x1) @ s1

    g = vmap(grad(signed_sum), in_dims=(None, 0, 0))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            k = model(x[:1].to(device)).shape[1]
        out = []
        for start in range(0, len(x), chunk):
            xb = x[start:start + chunk].to(device)
            sb = signs(y[start:start + chunk], k, kind).to(device=device, dtype=xb.dtype)
            gb = g(params, xb, sb)
            gb = torch.cat([gb[n].reshape(len(xb), -1) for n in names], 1)
            if sketch is not None:
                gb = _apply_sketch(gb, bucket, sign, sketch)
            out.append(gb)
    finally:
        model.train(was_training)
    return torch.cat(out) * scale ** 0.5


def gram(phi_a: torch.Tensor, phi_b: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    """κ = Φ_a Φ_bᵀ (Na, Nb), computed in row blocks (Φ_b = Φ_a by default)."""
    phi_b = phi_a if phi_b is None else phi_b
    return torch.cat([phi_a[i:i + block] @ phi_b.T for i in range(0, len(phi_a), block)])


def kernel_statistics(phi: torch.Tensor, y: torch.Tensor, *, zero_threshold: float, top_k: int, block: int = 1024,
                      max_pairs: int = 10_000_000, seed: int = 0) -> dict:
    r"""Statistics of κ = ΦΦᵀ (Φ (N, P): features on any device) one row block at a time, so that neither the N×N
    kernel nor its N(N+1)/2 pair indices ever exist (at N = 60,000 those would take 14 GB and 29 GB):

    - ``positive``, ``negative``, ``zero``: shares of the pairs i ≤ j with κ_ij > t, < −t, |κ_ij| ≤ t (t =
      ``zero_threshold``);
    - ``selfmax_full`` / ``selfmax_upper`` (N,) bool: κ_ii is the maximum of row i over all j / over j ≥ i (the
      official code's upper triangle);
    - ``negative_per_example`` (N,): the share of partners j ≠ i with κ_ij < −t;
    - ``same_class_top_k``: the share of the ``top_k`` most similar partners (j ≠ i) with i's label;
    - ``pairs``: the values κ_ij, i ≤ j, in row-major order — all of them when there are at most ``max_pairs``,
      else a uniform random subset of about ``max_pairs`` (for histograms).

    Everything returned is on the CPU."""
    n = len(phi)
    y = torch.as_tensor(y).to(phi.device)
    total = n * (n + 1) // 2
    keep_share = min(1.0, max_pairs / total)
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(3, dtype=torch.float64)
    out = {k: [] for k in ("selfmax_full", "selfmax_upper", "negative_per_example", "pairs")}
    same = 0.0
    for i0 in range(0, n, block):
        K = phi[i0:i0 + block] @ phi.T  # (B, N)
        rows = torch.arange(i0, i0 + len(K), device=K.device)
        cols = torch.arange(n, device=K.device)
        diag = K[torch.arange(len(K), device=K.device), rows]
        upper = cols[None, :] >= rows[:, None]
        vals = K[upper]  # row-major: row i, then j = i..N-1
        counts += torch.stack([(vals > zero_threshold).sum(), (vals < -zero_threshold).sum(),
                               (vals.abs() <= zero_threshold).sum()]).double().cpu()
        out["selfmax_full"].append((diag >= K.max(1).values).cpu())
        out["selfmax_upper"].append((diag >= K.masked_fill(~upper, -float("inf")).max(1).values).cpu())
        off = K.clone()
        off[torch.arange(len(K), device=K.device), rows] = -float("inf")
        negative = (K < -zero_threshold).sum(1) - (diag < -zero_threshold).long()  # partners j != i
        out["negative_per_example"].append((negative.double() / max(n - 1, 1)).cpu())
        nearest = off.topk(min(top_k, n - 1), 1).indices
        same += (y[nearest] == y[rows][:, None]).double().sum().item()
        if keep_share < 1:
            vals = vals[(torch.rand(len(vals), generator=g) < keep_share).to(vals.device)]
        out["pairs"].append(vals.cpu())
    res = {k: torch.cat(v) for k, v in out.items()}
    res |= dict(zip(("positive", "negative", "zero"), (counts / total).tolist()))
    res["same_class_top_k"] = same / (n * min(top_k, n - 1))
    return res


def entk_blocks(model, xa: torch.Tensor, xb: torch.Tensor, chunk: int | None = None, sketch: int | None = None,
                seed: int = 0) -> torch.Tensor:
    """Θ(x_a, x_b) = J(x_a) J(x_b)ᵀ for all pairs, (Na, Nb, K, K); model in eval mode. The Jacobians (chunk, K, P) are
    formed ``chunk`` examples at a time (:func:`mpe.curvature.auto_chunk` by default), those of x_b again for each
    chunk of x_a when both do not fit in one: memory O(chunk·K·P + Na·Nb·K²).

    ``sketch=p`` maps every Jacobian row through the :func:`count_sketch` of ``seed`` as it is formed and returns
    (S J(x_a)) (S J(x_b))ᵀ: each Jacobian is formed once, memory O(chunk·K·P + (Na + Nb)·K·p), entries unbiased with
    a relative error of order √(2/p) (the lpNTK features' sketch, :func:`features`)."""
    if sketch is not None:
        n_params = sum(p.numel() for p in model.parameters())
        bucket, sign = (t.to(next(model.parameters()).device) for t in count_sketch(n_params, sketch, seed))

        def sketched(x):
            return torch.cat([_apply_sketch(J, bucket, sign, sketch) for _, J in jacobians(model, x, chunk)])

        sa = sketched(xa)
        sb = sa if xb is xa else sketched(xb)
        return torch.einsum("akp,blp->abkl", sa, sb)
    out = None
    for sa, Ja in jacobians(model, xa, chunk):
        if out is None:
            out = Ja.new_empty(len(xa), len(xb), Ja.shape[1], Ja.shape[1])
        if xb is xa and sa.start == 0 and sa.stop == len(xa):  # everything in one chunk
            out[:] = torch.einsum("akp,blp->abkl", Ja, Ja)
            break
        for sb, Jb in jacobians(model, xb, chunk):
            out[sa, sb] = torch.einsum("akp,blp->abkl", Ja, Jb)
    return out


def delta_q(model, x_o: torch.Tensor, x_b: torch.Tensor, y_b: torch.Tensor, lr: float) -> torch.Tensor:
    r"""Eq. 1: predicted change of q(x_o) (No, K) after one plain-SGD step of size ``lr`` on the batch (x_b, y_b).

    Δq(x_o) ≈ lr · mean_b A(x_o) Θ(x_o, x_b) (e_{y_b} − q(x_b)), A = diag(q) − q qᵀ, for a mean-reduced
    cross-entropy (no momentum, no weight decay: the first-order effect of one gradient step). Since
    mean_b J(x_b)ᵀ(e_{y_b} − q(x_b)) = −∇_w L_batch, the sum over the batch is one Jacobian-vector product,
    Δq(x_o) = −lr · A(x_o) J(x_o) ∇_w L_batch, which is how it is computed (no eNTK blocks are formed).
    """
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    was_training = model.training
    model.eval()
    try:
        def logits(prm, x):
            return functional_call(model, (prm, buffers), (x,))

        g = grad(lambda prm: F.cross_entropy(logits(prm, x_b), y_b))(params)
        z_o, dz = jvp(lambda prm: logits(prm, x_o), (params,), ({n: -lr * g[n] for n in names},))
    finally:
        model.train(was_training)
    q_o = torch.softmax(z_o, 1)
    return q_o * dz - q_o * (q_o * dz).sum(1, keepdim=True)  # A(x_o) Δz


def two_layer_relu_entk(X: torch.Tensor, W1: torch.Tensor, W2: torch.Tensor) -> torch.Tensor:
    r"""Closed-form eNTK of f(x) = W2 relu(W1 x/√d)/√n (NTK parametrisation, no biases): (N, N, K, K).

    Θ_ij(x, x') = δ_ij relu(h)·relu(h')/n + Σ_m W2[i,m] W2[j,m] 1[h_m>0] 1[h'_m>0] (x·x')/(n d), h = W1 x/√d.
    W1 (n, d), W2 (K, n), X (N, d).
    """
    n, d = W1.shape
    h = X @ W1.T / d ** 0.5  # (N, n)
    a, da = torch.relu(h), (h > 0).to(X.dtype)
    K = W2.shape[0]
    first = (a @ a.T / n)[:, :, None, None] * torch.eye(K, dtype=X.dtype)
    second = torch.einsum("im,jm,am,bm->abij", W2, W2, da, da) * (X @ X.T / (n * d))[:, :, None, None]
    return first + second


def self_is_max(sim: torch.Tensor) -> torch.Tensor:
    """(n,) bool: the examples whose own entry is the maximum of their row of ``sim`` (n, n) — "selfmax" examples,
    which no other example resembles more than they resemble themselves. Full rows (the official code compares only
    against j >= i, which favours larger indices)."""
    sim = torch.as_tensor(sim)
    return torch.diagonal(sim) >= sim.max(1).values


def fpc(sim: torch.Tensor, n_clusters: int, selfmax_guard: bool = True) -> list[tuple[int, list[int]]]:
    r"""Farthest-point clustering of one class by raw similarity, as the official lpNTK code does it.

    ``sim`` (n, n) symmetric (e.g. the within-class lpNTK). Returns [(head, members sorted by similarity to the head,
    head first)]. The procedure: the first head is the first index of the largest entry; then repeatedly the member
    least similar to its own head (over all clusters, the globally smallest such similarity) becomes a new head, and
    every non-head member moves to it if it is more similar to it than to its current head — until ``n_clusters``.
    With ``selfmax_guard`` (official behaviour), if at most ``n_clusters`` examples have their own entry as their
    row maximum, those examples are returned as singletons and the rest dropped. Unlike the official code, the row
    maximum is taken over the full row (the official upper-triangle version is biased to larger indices).
    """
    n = sim.shape[0]
    if sim.shape != (n, n) or not 1 <= n_clusters <= n:
        raise ValueError(f"need a square similarity matrix and 1 <= n_clusters <= n = {n}, got {n_clusters}")
    sim = torch.as_tensor(sim).detach().to("cpu", torch.float64)  # n ≤ a class: the loop's bookkeeping is on the CPU
    if selfmax_guard:
        selfmax = torch.nonzero(self_is_max(sim)).flatten().tolist()
        if len(selfmax) <= n_clusters:
            return [(i, [i]) for i in selfmax]
    iu = torch.triu_indices(n, n)
    first = iu[:, torch.argmax(sim[iu[0], iu[1]])]
    head = int(first[0])
    owner = torch.full((n,), head, dtype=torch.long)  # the head each example belongs to
    heads = [head]
    while len(heads) < n_clusters:
        to_own = sim[torch.arange(n), owner]
        to_own[heads] = float("inf")  # heads never move
        c = n - 1 - int(torch.argmin(to_own.flip(0)))  # the farthest point; ties go to the highest index
        heads.append(c)
        owner[c] = c
        closer = sim[c] > sim[torch.arange(n), owner]
        closer[heads] = False
        owner[closer] = c
    out = []
    for h in heads:
        members = torch.nonzero(owner == h).flatten()
        order = torch.argsort(-sim[h, members], stable=True)
        out.append((h, [int(m) for m in members[order]]))
    return out
