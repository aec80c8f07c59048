r"""Data pruning rules (lpNTK paper, E8/E9) and the score baselines they are compared with.

Every rule works per class and returns the indices to **keep** (sorted, a CPU tensor whatever the device of the
scores or features), so that each class loses the same fraction:

- :func:`prune_clusters` — lpNTK's rule: farthest-point clusters of the within-class kernel; the redundant examples
  are those in large clusters of mutually interchangeable examples, so members (never heads) are removed at random
  from whichever cluster is currently the largest. The official ``node`` rule (keep a random half of the single
  largest cluster) is the special case of removing half of that cluster.
- :func:`prune_single_linkage` — the official alternative (``hier``): merge the most similar pairs first (single
  linkage, Kruskal) until as many groups remain as examples are kept, and keep one random member of each group.
- :func:`average_similarity` + :func:`prune_lowest` — rank by the mean lpNTK to the own class and remove the most
  typical examples (the official ``avg`` rule, with the order its ``--class-merged`` path intends).
- :func:`prune_selfmax` — the official ``selfmax`` filter: only examples that are their own most similar example
  survive; ``faithful=True`` keeps a random share of those (and so a class size the other rules do not match),
  the default removes the others first and then random selfmax examples, to the common per-class fraction.
- :func:`prune_lowest` — remove the examples with the lowest score (EL2N, GraNd, forgetting count: the "easy" ones).
- :func:`prune_random` — the random baseline.
"""
from __future__ import annotations

import torch

from .kernels import fpc, gram, self_is_max

__all__ = ["prune_clusters", "prune_single_linkage", "prune_selfmax", "average_similarity", "prune_lowest",
           "prune_random", "grand_scores"]


def _check(fraction):
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction to remove must lie in [0, 1), got {fraction}")


def _per_class(y, fraction, choose, always: bool = False):
    """Keep-indices after ``choose(members, n_remove)`` picked the removed examples of each class (called even for
    n_remove = 0 when ``always``)."""
    _check(fraction)
    y = torch.as_tensor(y).cpu()  # the bookkeeping is on the CPU; features and kernels stay on their device
    keep = []
    for c in torch.unique(y):
        members = torch.nonzero(y == c).flatten()
        n_remove = int(round(fraction * len(members)))
        removed = set(choose(members, n_remove)) if n_remove or always else set()
        keep += [int(i) for i in members if int(i) not in removed]
    return torch.tensor(sorted(keep))


def prune_random(y: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return _per_class(y, fraction, lambda m, k: m[torch.randperm(len(m), generator=g)[:k]].tolist())


def prune_lowest(scores: torch.Tensor, y: torch.Tensor, fraction: float) -> torch.Tensor:
    """Remove the ``fraction`` of each class with the lowest ``scores`` (N,) (ties: lower index first)."""
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    return _per_class(y, fraction, lambda m, k: m[torch.argsort(scores[m], stable=True)[:k]].tolist())


def prune_clusters(phi: torch.Tensor, y: torch.Tensor, fraction: float, cluster_ratio: float = 0.5,
                   seed: int = 0) -> torch.Tensor:
    """lpNTK pruning: per class, FPC (M = ⌊cluster_ratio·n_c⌋, raw similarity of the Gram matrix of ``phi`` (N, P)),
    then remove random non-head members from the currently largest cluster until ``fraction`` of the class is gone."""
    g = torch.Generator().manual_seed(seed)

    def choose(members, k):
        clusters = fpc(gram(phi[members]), max(1, int(cluster_ratio * len(members))), selfmax_guard=False)
        pools = [[m for m in mem if m != h] for h, mem in clusters]  # heads are kept
        pools = [[p[i] for i in torch.randperm(len(p), generator=g).tolist()] for p in pools]
        removed = []
        for _ in range(k):
            j = max(range(len(pools)), key=lambda i: (len(pools[i]), -i))
            if not pools[j]:
                break
            removed.append(int(members[pools[j].pop()]))
        return removed

    return _per_class(y, fraction, choose)


def prune_single_linkage(phi: torch.Tensor, y: torch.Tensor, fraction: float, seed: int = 0) -> torch.Tensor:
    """Per class, single-linkage merging of the most similar pairs (Gram matrix of ``phi``) until the class has as many
    groups as examples to keep; one random member of each group is kept."""
    g = torch.Generator().manual_seed(seed)

    def choose(members, k):
        n = len(members)
        sim = gram(phi[members])
        iu = torch.triu_indices(n, n, offset=1)
        order = torch.argsort(-sim[iu[0], iu[1]], stable=True)
        parent = list(range(n))

        def root(i):
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        merges = 0
        for e in order.tolist():
            if merges == k:
                break
            a, b = root(int(iu[0, e])), root(int(iu[1, e]))
            if a != b:
                parent[b] = a
                merges += 1
        groups = {}
        for i in range(n):
            groups.setdefault(root(i), []).append(i)
        kept = {grp[int(torch.randint(len(grp), (1,), generator=g))] for grp in groups.values()}
        return [int(members[i]) for i in range(n) if i not in kept]

    return _per_class(y, fraction, choose)


def prune_selfmax(phi: torch.Tensor, y: torch.Tensor, fraction: float, seed: int = 0,
                  faithful: bool = False) -> torch.Tensor:
    """Per class, the selfmax filter on the Gram matrix of ``phi`` (N, P) (:func:`mpe.kernels.self_is_max`).

    Default: remove ``fraction`` of the class, the non-selfmax examples first (in random order), then random selfmax
    examples. ``faithful=True`` (official ``exp4.1 selfmax``): keep a random round((1 - fraction)·|S_c|) of the
    class's selfmax examples S_c and drop every other example, so the kept size depends on |S_c|."""
    g = torch.Generator().manual_seed(seed)

    def choose(members, k):
        top = self_is_max(gram(phi[members])).cpu()
        order = torch.randperm(len(members), generator=g)
        others, selfmax = order[~top[order]], order[top[order]]
        if faithful:
            k = len(others) + len(selfmax) - int(round((1 - fraction) * len(selfmax)))
        return members[torch.cat([others, selfmax])[:k]].tolist()

    return _per_class(y, fraction, choose, always=faithful)


def average_similarity(phi: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean kernel value of each example to the examples of its own class (self included), (N,)."""
    y = torch.as_tensor(y).to(phi.device)
    out = torch.empty(len(y), dtype=phi.dtype, device=phi.device)
    for c in torch.unique(y):
        m = torch.nonzero(y == c).flatten()
        out[m] = gram(phi[m]).mean(1)
    return out


def grand_scores(make_model, x: torch.Tensor, y: torch.Tensor, n_inits: int = 3) -> torch.Tensor:
    """GraNd (Paul et al. 2021): E over ``n_inits`` initialisations of ‖∇_w ℓ(x_i, y_i)‖ at initialisation, (N,).
    ``make_model(seed)`` returns an initialised model."""
    from .curvature import per_example_grads

    out = 0
    for s in range(n_inits):
        model = make_model(s)
        out = out + torch.cat([per_example_grads(model, x[i:i + 256], y[i:i + 256]).norm(dim=1)
                               for i in range(0, len(x), 256)])
    return out / n_inits
