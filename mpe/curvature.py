r"""Per-example Jacobians and gradients, GGN posteriors (full, diagonal, K-FAC), optimiser variances, and the GLM
predictive covariance V_i = J_i S⁻¹ J_iᵀ.

Notation: f_i(θ) ∈ R^K are the logits of example i, J_i = ∂f_i/∂θ ∈ R^{K×P}, p_i = softmax(f_i) and
Λ_i = diag(p_i) − p_i p_iᵀ the softmax Hessian. The generalised Gauss–Newton on the sum scale is
G = Σ_i J_iᵀ Λ_i J_i, and the posterior precision is S = G + δ I (δ = prior precision).

A *posterior* here is one of three small objects holding S (or its factors):

- ``("full", S)``            S (P, P)
- ``("diag", s)``            s (P,), S = diag(s)
- ``("kfac", layers, δ)``    per Linear/Conv2d layer, eigen-decomposed Kronecker factors of G plus δ I.

``predictive_covariance(model, x, posterior)`` returns V (N, K, K) for any of them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

__all__ = ["jacobians", "per_example_grads", "softmax_hessian", "sqrt_softmax_hessian", "ggn_full", "ggn_diag",
           "kfac_factors", "Posterior", "full_posterior", "diag_posterior", "kfac_posterior", "laplace_posterior",
           "ivon_posterior", "adam_posterior", "predictive_covariance", "whitened_jacobians", "auto_chunk"]


def auto_chunk(k: int, p: int, budget: float | None = None, device=None) -> int:
    """Examples per Jacobian chunk so that a (chunk, K, P) tensor holds about ``budget`` floats: by default 5·10⁷
    (200 MB) on the CPU, and on a GPU a sixteenth of its free memory if that is more (the transforms' intermediates
    take several times the result)."""
    if budget is None:
        budget = 5e7
        if device is not None and torch.device(device).type == "cuda":
            budget = max(budget, torch.cuda.mem_get_info(device)[0] / 4 / 16)
    return max(1, int(budget // max(k * p, 1)))


def _functional(model: nn.Module):
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def f(prm, x1):  # one example x1 (C, H, W) -> logits (K,)
        return functional_call(model, (prm, buffers), (x1.unsqueeze(0),)).squeeze(0)

    return f, params, names


def jacobians(model: nn.Module, x: torch.Tensor, chunk: int | None = None):
    """Yield (slice, J) with J (n, K, P) the per-example Jacobians of the logits, in chunks of ``chunk`` examples.

    Computed with ``vmap(jacrev(functional_call))`` at the current parameters, in eval mode.
    """
    f, params, names = _functional(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    jac = vmap(jacrev(f), in_dims=(None, 0))
    with torch.no_grad():
        k = model(x[:1].to(device)).shape[1]
    p = sum(v.numel() for v in params.values())
    chunk = chunk or auto_chunk(k, p, device=device)
    try:
        for start in range(0, len(x), chunk):
            xb = x[start:start + chunk].to(device)
            js = jac(params, xb)
            yield slice(start, start + len(xb)), torch.cat([js[n].reshape(len(xb), k, -1) for n in names], dim=2)
    finally:
        model.train(was_training)


def per_example_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example gradients of the cross-entropy ∇ℓ_i = J_iᵀ(p_i − y_i), shape (N, P), in eval mode (no dropout).

    For a model whose parameters all sit in Linear and Conv2d layers, from one batched backward pass: a layer's
    ∇_W ℓ_i = Σ_t g_it a_itᵀ (output gradients g, inputs a), written straight into the (N, P) result: an outer
    product for a dense layer, one grouped convolution for a convolution (:func:`_conv_weight_grads`); other models
    through ``torch.func`` (vmap of grad)."""
    layers = _layer_route(model)
    if layers is not None:
        chunk = min(512, auto_chunk(1, max(m.weight.numel() for m, _, _ in layers)))
        out = None
        for sl, logits, io in _layer_io(model, x, chunk, y, inputs=lambda m, inp: inp):
            if out is None:
                out = logits.new_empty(len(x), sum(p.numel() for p in model.parameters()))
            for (m, w_off, b_off), (a, g) in zip(layers, io):  # a the layer's input, g (n, 1, out, T)
                g = g[:, 0]
                w = out[sl, w_off:w_off + m.weight.numel()].view(len(g), *m.weight.shape)
                if isinstance(m, nn.Linear):
                    torch.mul(g, a.reshape(len(g), 1, -1), out=w)  # (n, out, 1) x (n, 1, in), no copy
                else:
                    _conv_weight_grads(m, a, g, w)
                if b_off is not None:
                    out[sl, b_off:b_off + g.shape[1]] = g.sum(-1)
        return out
    f, params, names = _functional(model)
    device = next(model.parameters()).device

    def loss(prm, x1, y1):
        return F.cross_entropy(f(prm, x1).unsqueeze(0), y1.unsqueeze(0))

    was_training = model.training
    model.eval()
    try:
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.to(device), y.to(device))
    finally:
        model.train(was_training)
    return torch.cat([g[n].reshape(len(x), -1) for n in names], dim=1)


def _conv_weight_grads(m: nn.Conv2d, x: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """Per-example weight gradients of a convolution written into ``out`` (n, out, in, kh, kw), from its inputs x
    (n, in, H, W) and output gradients g (n, out, T). A convolution's weight gradient is the correlation of its
    (padded) input with its output gradient: for all examples at once, one convolution of the inputs with the
    examples as groups and each example's output gradients as its kernels (the forward stride becomes the dilation and
    vice versa); with one output position, an outer product with the one patch. No patches are unfolded: on a CPU
    2-3x faster than unfolding and a batched matmul."""
    n = len(x)
    (kh, kw), (sh, sw), (dh, dw) = m.kernel_size, m.stride, m.dilation
    x = _padded(m, x)
    ho, wo = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1, (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    if ho * wo == 1:
        patch = x[:, :, :dh * (kh - 1) + 1:dh, :dw * (kw - 1) + 1:dw]  # (n, in, kh, kw)
        torch.mul(g[:, :, :, None, None], patch[:, None], out=out)
        return
    kernels = g.reshape(n * g.shape[1], 1, ho, wo)
    grads = F.conv2d(x.transpose(0, 1), kernels, stride=(dh, dw), dilation=(sh, sw), groups=n)  # (in, n·out, ≥kh, ≥kw)
    out.copy_(grads[..., :kh, :kw].unflatten(1, (n, -1)).permute(1, 2, 0, 3, 4))


def softmax_hessian(p: torch.Tensor) -> torch.Tensor:
    """Λ = diag(p) − p pᵀ for probabilities p (N, K); returns (N, K, K)."""
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


def sqrt_softmax_hessian(p: torch.Tensor) -> torch.Tensor:
    """L with L Lᵀ = Λ: L = diag(√p) − p √pᵀ (column c is √p_c (e_c − p)); shape (N, K, K)."""
    s = p.clamp_min(0).sqrt()
    return torch.diag_embed(s) - p.unsqueeze(2) * s.unsqueeze(1)


def _probs(model, x):
    from .train import predict

    return torch.softmax(predict(model, x), dim=1)


def ggn_full(model: nn.Module, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """G = Σ_i J_iᵀ Λ_i J_i, shape (P, P). Only for small models (P up to a few thousand)."""
    probs, out = _probs(model, x), None
    for sl, J in jacobians(model, x, chunk):
        M = torch.einsum("nkp,nkc->ncp", J, sqrt_softmax_hessian(probs[sl])).reshape(-1, J.shape[2])
        out = M.T @ M if out is None else out + M.T @ M
    return out


def ggn_diag(model: nn.Module, x: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    r"""diag(G) = Σ_i Σ_c (J_iᵀ L_i[:, c])², shape (P,).

    For a model built from Linear and Conv2d layers, from each layer's inputs a and output gradients g: the
    per-example GGN column c of a layer is Σ_t (L_iᵀ g_it)_c a_itᵀ (rank one for a dense layer, whose square is then
    g_c² (a²)ᵀ), so a chunk costs one batched forward and K backward passes instead of a Jacobian per example. Other
    models go through :func:`jacobians`.
    """
    layers = _layer_route(model)
    if layers is None:
        probs, out = _probs(model, x), 0
        for sl, J in jacobians(model, x, chunk):
            out = out + torch.einsum("nkp,nkc->ncp", J, sqrt_softmax_hessian(probs[sl])).pow(2).sum((0, 1))
        return out
    out = 0
    for _, logits, io in _layer_io(model, x, chunk or _layer_chunk(layers)):
        L = sqrt_softmax_hessian(torch.softmax(logits, 1))
        parts = []
        for a, g in io:
            gc = _columns(L, g)  # output gradients of the columns of L_iᵀ f_i
            if a.shape[1] == 1:
                parts.append(gc[..., 0].pow(2).sum(1).T @ a[:, 0].pow(2))  # Σ_i (Σ_c gc²) (a²)ᵀ
            else:
                parts.append(_jacobian(gc, a).pow(2).sum((0, 1)))
        out = out + _to_flat(layers, parts)
    return out


# --------------------------------------------------------------------------------------------------------------
# K-FAC for Linear and Conv2d ("expand" convention for convolutions: spatial positions count as examples)
# --------------------------------------------------------------------------------------------------------------
def _layers(model: nn.Module):
    """(module, weight offset, bias offset or None) for each Linear/Conv2d; error for other parametrised modules."""
    offsets, i = {}, 0
    for p in model.parameters():
        offsets[id(p)] = i
        i += p.numel()
    out = []
    for m in model.modules():
        own = list(m.parameters(recurse=False))
        if not own:
            continue
        if not isinstance(m, (nn.Linear, nn.Conv2d)):
            raise NotImplementedError(f"K-FAC supports Linear and Conv2d layers only; {type(m).__name__} has "
                                      "parameters (use a full or diagonal posterior for this model)")
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            raise NotImplementedError("K-FAC for grouped convolutions is not implemented")
        out.append((m, offsets[id(m.weight)], None if m.bias is None else offsets[id(m.bias)]))
    return out


def _unfolded(m, inp):
    """A layer's inputs as columns (n, D, T), the patches of a convolution unfolded, without a bias row."""
    if isinstance(m, nn.Linear):
        return inp.reshape(inp.shape[0], -1, 1)
    return F.unfold(_padded(m, inp), m.kernel_size, m.dilation, 0, m.stride)


def _padded(m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input padded as the layer pads it: every padding it accepts ("same", reflect, ...)."""
    pad = m._reversed_padding_repeated_twice  # as F.pad wants it
    return F.pad(x, pad, mode="constant" if m.padding_mode == "zeros" else m.padding_mode) if any(pad) else x


def _layer_inputs(m, inp):
    """Rows a (N, T, D): :func:`_unfolded` as rows, with a trailing 1 for the bias."""
    a = _unfolded(m, inp).transpose(1, 2)
    if m.bias is not None:
        a = torch.cat([a, torch.ones_like(a[..., :1])], dim=2)
    return a


@dataclass
class Posterior:
    """A Gaussian posterior precision S in one of the forms listed in the module docstring."""

    kind: str
    data: object
    delta: float = 0.0


def kfac_factors(model: nn.Module, x: torch.Tensor, batch_size: int = 256) -> list[tuple]:
    r"""Kronecker factors (A, G, count) per layer with G_layer ≈ (1/count) A ⊗ G (exact GGN in Kronecker shape).

    A = Σ_{i,t} a_it a_itᵀ (inputs with a bias 1), G = Σ_{i,t,c} g_itc g_itcᵀ with g_itc = ∂(L_i[:, c]ᵀ f_i)/∂s_it
    the output gradient of the c-th column of the softmax-Hessian square root; count = N·T.
    For one example and one spatial position this is the exact GGN block.
    """
    A, G, count = {}, {}, {}
    for _, logits, io in _layer_io(model, x, batch_size):
        L = sqrt_softmax_hessian(torch.softmax(logits, 1))
        for j, (a, g) in enumerate(io):
            gc = _columns(L, g).flatten(0, 1)  # output gradients of the columns of L_iᵀ f_i, (n C, out, T)
            a2 = a.reshape(-1, a.shape[2])
            A[j] = A.get(j, 0) + a2.T @ a2
            g2 = gc.transpose(1, 2).reshape(-1, gc.shape[1]) if gc.shape[2] < gc.shape[1] else None  # few positions
            G[j] = G.get(j, 0) + (g2.T @ g2 if g2 is not None else (gc @ gc.mT).sum(0))
            count[j] = count.get(j, 0) + a.shape[0] * a.shape[1]
    return [(A[j], G[j], count[j]) for j in sorted(A)]


def kfac_posterior(model: nn.Module, x: torch.Tensor, delta: float, batch_size: int = 256) -> Posterior:
    """K-FAC Laplace: S ≈ blockdiag((1/count) A ⊗ G) + δ I, stored as eigen-decompositions of A and G."""
    if delta <= 0:
        raise ValueError("the K-FAC posterior needs a positive prior precision delta")
    eig = []
    for A, G, count in kfac_factors(model, x, batch_size):
        la, Ua = torch.linalg.eigh(A)
        lg, Ug = torch.linalg.eigh(G)
        eig.append((Ua, la.clamp_min(0), Ug, lg.clamp_min(0), count))
    return Posterior("kfac", eig, delta)


def full_posterior(model: nn.Module, x: torch.Tensor, delta: float) -> Posterior:
    g = ggn_full(model, x)
    return Posterior("full", g + delta * torch.eye(len(g), dtype=g.dtype, device=g.device), delta)


def diag_posterior(model: nn.Module, x: torch.Tensor, delta: float) -> Posterior:
    return Posterior("diag", ggn_diag(model, x) + delta, delta)


LAPLACE = ("kfac", "diag", "full")


def laplace_posterior(kind: str, model: nn.Module, x: torch.Tensor, delta: float) -> Posterior:
    """Laplace GGN posterior of ``kind`` ("kfac", "diag" or "full") with prior precision ``delta`` on data ``x``."""
    makers = {"kfac": kfac_posterior, "diag": diag_posterior, "full": full_posterior}
    if kind not in makers:
        raise ValueError(f"unknown posterior {kind!r}; valid choices: {', '.join(LAPLACE)}")
    return makers[kind](model, x, delta)


def ivon_posterior(optimizer) -> Posterior:
    """IVON/iBLR: σ² = 1/(ess·(h + wd)), i.e. S = diag(N h + δ) with wd = δ/N, ess = N (MPE notes §1.11)."""
    g = optimizer.param_groups[0]
    return Posterior("diag", g["ess"] * (g["hess"] + g["weight_decay"]), g["ess"] * g["weight_decay"])


def adam_posterior(optimizer, n: int, delta: float) -> Posterior:
    """Adam (Fig. 10): S = diag(N √v + δ), v Adam's (uncorrected) second moment, in parameter order."""
    v = torch.cat([optimizer.state[p]["exp_avg_sq"].reshape(-1) for g in optimizer.param_groups
                   for p in g["params"]])
    return Posterior("diag", n * v.sqrt() + delta, delta)


def _layer_io(model, x, batch_size=256, y=None, inputs=None):
    """Yield (slice, logits, [(a (n, T, D), g (n, K, out, T)) per layer]): layer inputs (T spatial positions, a
    trailing 1 for the bias) and ∂f_k/∂s per example, in the layout the backward pass gives (no transposed copy).
    With labels ``y``, g (n, 1, out, T) is instead the output gradient of the example's cross-entropy: one backward
    pass. ``inputs(module, input)`` replaces :func:`_layer_inputs` as the maker of a."""
    inputs = inputs or _layer_inputs
    layers = _layers(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    store = {}
    hooks = [m.register_forward_hook(lambda m, i, o: store.__setitem__(m, (i[0].detach(), o))) for m, _, _ in layers]
    try:
        for s in range(0, len(x), batch_size):
            xb = x[s:s + batch_size].to(device)
            store.clear()
            logits = model(xb)
            outs = [store[m][1] for m, _, _ in layers]
            n, K = logits.shape
            targets = [logits[:, k].sum() for k in range(K)] if y is None else [
                F.cross_entropy(logits, y[s:s + n].to(device), reduction="sum")]
            grads = [o.new_empty(n, len(targets), o.shape[1], o[0, 0].numel()) for o in outs]
            for k, f in enumerate(targets):  # examples are independent in eval mode: ∂(Σ_i f_ik)/∂s_i = ∂f_ik/∂s_i
                for j, g in enumerate(torch.autograd.grad(f, outs, retain_graph=k < len(targets) - 1)):
                    grads[j][:, k] = g.reshape(n, g.shape[1], -1)
            yield slice(s, s + n), logits.detach(), [
                (inputs(m, store[m][0]), grads[j]) for j, (m, _, _) in enumerate(layers)]
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)


def _layer_route(model: nn.Module):
    """:func:`_layers` of a model whose parameters all sit in Linear or Conv2d layers (the layer-wise route of
    :func:`ggn_diag` and :func:`predictive_covariance`), else None."""
    try:
        return _layers(model)
    except NotImplementedError:
        return None


def _columns(L: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Output gradients of the columns of L_iᵀ f_i: (Lᵀ g) (n, C, out, T) from L (n, K, C) and g (n, K, out, T)."""
    n, k, o, t = g.shape
    return (L.mT @ g.reshape(n, k, o * t)).reshape(n, L.shape[2], o, t)


def _jacobian(g: torch.Tensor, a: torch.Tensor, Ug=None, Ua=None) -> torch.Tensor:
    """A layer's per-example Jacobian ∂f_ik/∂W = Σ_t g_ikt a_itᵀ, (n, K, out, D), from g (n, K, out, T) and a (n, T,
    D); in the bases U_G, U_A (U_Gᵀ J U_A) where given, rotating before or after the sum, whichever costs less."""
    n, k, o, t = g.shape
    d = a.shape[2]
    if Ug is not None and t * (d * d + k * o * o) < k * o * d * (o + d):  # rotate the inputs and output gradients
        g, a, Ug, Ua = Ug.T @ g, a @ Ua, None, None
    J = (g.reshape(n, k * o, t) @ a).reshape(n, k, o, d)
    return J if Ug is None else Ug.T @ J @ Ua


def _layer_chunk(layers) -> int:
    """Examples per chunk of the layer route: a convolution's per-example Jacobian (n, K, out, D) within budget (K
    read off the last layer)."""
    k = layers[-1][0].weight.shape[0]
    conv = [m.weight.numel() for m, _, _ in layers if isinstance(m, nn.Conv2d)]
    return min(256, auto_chunk(k, max(conv, default=1)))


def _to_flat(layers, parts, out=None) -> torch.Tensor:
    """Per-layer (..., out, D) blocks, bias in the last column where there is one, as (..., P) in parameter order
    (written into ``out`` where given)."""
    lead = parts[0].shape[:-2]
    if out is None:
        out = torch.empty(*lead, sum(d.shape[-2] * d.shape[-1] for d in parts), dtype=parts[0].dtype,
                          device=parts[0].device)
    for (m, w_off, b_off), d in zip(layers, parts):
        nw = m.weight[0].numel()
        out[..., w_off:w_off + m.weight.numel()].unflatten(-1, (d.shape[-2], nw)).copy_(d[..., :nw])  # one copy
        if b_off is not None:
            out[..., b_off:b_off + d.shape[-2]] = d[..., nw]
    return out


def _from_flat(layers, v) -> list[torch.Tensor]:
    """Inverse of :func:`_to_flat`: (..., P) in parameter order as per-layer (..., out, D) blocks."""
    parts = []
    for m, w_off, b_off in layers:
        o = m.weight.shape[0]
        d = v[..., w_off:w_off + m.weight.numel()].reshape(*v.shape[:-1], o, -1)
        parts.append(d if b_off is None else torch.cat([d, v[..., b_off:b_off + o, None]], -1))
    return parts


def _layer_cov(model, x, blocks, batch_size=256):
    r"""V_i = Σ_layers J̃_i P̃⁻¹ J̃_iᵀ from layer inputs and output gradients, the precision P̃ diagonal in a basis.

    ``blocks`` has per layer (U_A or None, U_G or None, prec (out, D)): the layer's Jacobian ∂f_ik/∂W = Σ_t g_ikt
    a_itᵀ in the basis J̃_k = Σ_t (U_Gᵀ g_ikt)(U_Aᵀ a_it)ᵀ (K-FAC's eigenbases; None: the parameters' own, for a
    diagonal S) has the precision ``prec``. A rank-one shortcut (T = 1) avoids forming J̃ for dense layers.
    """
    out = []
    for _, logits, io in _layer_io(model, x, batch_size):
        n, k = logits.shape
        V = torch.zeros(n, k, k, dtype=logits.dtype, device=logits.device)
        for (a, g), (Ua, Ug, prec) in zip(io, blocks):
            if a.shape[1] == 1:
                at = a[:, 0] if Ua is None else a[:, 0] @ Ua  # (n, D)
                gt = g[..., 0] if Ug is None else g[..., 0] @ Ug  # (n, K, out)
                w = at.pow(2) @ (1 / prec).T  # (n, out): Σ_j ã_j² / prec_oj
                V += (gt * w[:, None]) @ gt.mT
            else:
                W = (_jacobian(g, a, Ug, Ua) * prec.rsqrt()).reshape(n, k, -1)
                V += W @ W.mT
        out.append(V)
    return torch.cat(out)


def _kfac_cov(model, x, post, batch_size=256):
    """V_i for a K-FAC posterior: in each layer's Kronecker eigenbasis the precision is λ^G_o λ^A_j / count + δ."""
    return _layer_cov(model, x, [(Ua, Ug, lg[:, None] * la[None, :] / count + post.delta)
                                 for Ua, la, Ug, lg, count in post.data], batch_size)


def whitened_jacobians(model: nn.Module, x: torch.Tensor, posterior: Posterior) -> torch.Tensor:
    r"""Z (N, K, Q) with J_i S⁻¹ J_jᵀ = Z_i Z_jᵀ for every pair of examples: the joint logit covariance of a group.

    full: Z_i = (L⁻¹ J_iᵀ)ᵀ with S = L Lᵀ; diag: Z_i = J_i / √s; kfac: per layer, the Jacobian in the Kronecker
    eigenbasis divided by the square root of the (diagonal there) precision. Memory N·K·P: meant for groups.
    """
    if posterior.kind == "kfac":
        out = []
        for _, logits, io in _layer_io(model, x):
            parts = []
            for (a, g), (Ua, la, Ug, lg, count) in zip(io, posterior.data):
                prec = lg[:, None] * la[None, :] / count + posterior.delta  # (out, D)
                Jt = _jacobian(g, a, Ug, Ua) * prec.rsqrt()
                parts.append(Jt.reshape(Jt.shape[0], Jt.shape[1], -1))
            out.append(torch.cat(parts, 2))
        return torch.cat(out)
    if posterior.kind not in ("full", "diag"):
        raise ValueError(f"unknown posterior kind {posterior.kind!r}; valid: full, diag, kfac")
    J = torch.cat([j for _, j in jacobians(model, x)])
    if posterior.kind == "diag":
        return J / posterior.data.sqrt()
    chol = torch.linalg.cholesky(posterior.data)
    Z = torch.linalg.solve_triangular(chol, J.reshape(-1, J.shape[2]).T, upper=False)  # L⁻¹ Jᵀ
    return Z.T.reshape(J.shape)


def predictive_covariance(model: nn.Module, x: torch.Tensor, posterior: Posterior, chunk: int | None = None
                          ) -> torch.Tensor:
    """GLM predictive covariance of the logits V_i = J_i S⁻¹ J_iᵀ for every example, shape (N, K, K)."""
    if posterior.kind == "kfac":
        return _kfac_cov(model, x, posterior)
    if posterior.kind == "diag" and (layers := _layer_route(model)) is not None:
        return _layer_cov(model, x, [(None, None, d) for d in _from_flat(layers, posterior.data)],
                          chunk or _layer_chunk(layers))
    out = []
    if posterior.kind == "full":
        chol = torch.linalg.cholesky(posterior.data)
    for _, J in jacobians(model, x, chunk):
        if posterior.kind == "diag":
            out.append(torch.einsum("nkp,nlp->nkl", J / posterior.data, J))
        elif posterior.kind == "full":
            Z = torch.linalg.solve_triangular(chol, J.reshape(-1, J.shape[2]).T, upper=False)  # L⁻¹ Jᵀ
            Z = Z.T.reshape(J.shape)
            out.append(torch.einsum("nkp,nlp->nkl", Z, Z))
        else:
            raise ValueError(f"unknown posterior kind {posterior.kind!r}; valid: full, diag, kfac")
    return torch.cat(out)
