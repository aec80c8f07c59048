"""Pruning rules on hand-made scores and kernels."""
import pytest
import torch

from mpe.pruning import prune_clusters, prune_lowest, prune_random


def test_prune_lowest_is_per_class():
    y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    scores = torch.tensor([4.0, 1.0, 3.0, 2.0, 0.5, 0.1, 0.9, 0.7])
    assert prune_lowest(scores, y, 0.5).tolist() == [0, 2, 6, 7]
    assert prune_lowest(scores, y, 0.0).tolist() == list(range(8))
    with pytest.raises(ValueError, match="fraction"):
        prune_lowest(scores, y, 1.0)


def test_prune_random_keeps_the_class_balance_and_is_seeded():
    y = torch.arange(40) % 4
    keep = prune_random(y, 0.3, seed=1)
    assert torch.bincount(y[keep]).tolist() == [7, 7, 7, 7]
    assert torch.equal(keep, prune_random(y, 0.3, seed=1)) and not torch.equal(keep, prune_random(y, 0.3, seed=2))


def test_prune_clusters_removes_from_the_largest_group_of_near_duplicates():
    # one class: 6 near-identical feature vectors (a redundant group) and 4 distinct ones
    g = torch.Generator().manual_seed(0)
    base = torch.randn(1, 20, generator=g)
    phi = torch.cat([base + 0.01 * torch.randn(6, 20, generator=g), 3 * torch.randn(4, 20, generator=g)])
    y = torch.zeros(10, dtype=torch.long)
    keep = prune_clusters(phi, y, 0.3, cluster_ratio=0.5)
    assert len(keep) == 7
    assert set(range(6, 10)) <= set(keep.tolist())  # only members of the redundant group were removed
