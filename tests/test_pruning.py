"""Pruning rules on hand-made scores and kernels."""
import pytest
import torch

from mpe.pruning import prune_clusters, prune_lowest, prune_random, prune_selfmax


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


def test_single_linkage_keeps_one_of_each_near_duplicate_group():
    from mpe.pruning import prune_single_linkage

    g = torch.Generator().manual_seed(0)
    centres = 5 * torch.randn(3, 8, generator=g)
    phi = torch.cat([centres[k] + 0.01 * torch.randn(4, 8, generator=g) for k in range(3)])  # 3 groups of 4
    y = torch.zeros(12, dtype=torch.long)
    keep = prune_single_linkage(phi, y, 0.75)  # 9 merges: exactly the within-group pairs
    assert len(keep) == 3 and sorted(int(i) // 4 for i in keep) == [0, 1, 2]


def test_average_similarity_by_hand():
    from mpe.pruning import average_similarity

    phi = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    y = torch.tensor([0, 0, 1])
    assert average_similarity(phi, y).tolist() == [1.0, 1.5, 4.0]  # (1 + 1) / 2, (1 + 2) / 2, 4 / 1


def test_selfmax_filter_by_hand():
    """Per class: [3,0] and [0,2] are their own most similar example; [1,0] is closer to [3,0] (3 > 1) and [0,1] to
    [0,2] (2 > 1), so they go first. Class 1 is the same pattern shifted."""
    block = torch.tensor([[3.0, 0], [1, 0], [0, 2], [0, 1]])
    phi, y = torch.cat([block, 2 * block]), torch.tensor([0] * 4 + [1] * 4)
    assert prune_selfmax(phi, y, 0.5).tolist() == [0, 2, 4, 6]
    quarter = prune_selfmax(phi, y, 0.25, seed=3).tolist()
    assert len(quarter) == 6 and {0, 2, 4, 6} <= set(quarter)
    assert prune_selfmax(phi, y, 0.0, faithful=True).tolist() == [0, 2, 4, 6]   # the others go even at fraction 0
    half = prune_selfmax(phi, y, 0.5, faithful=True, seed=1).tolist()
    assert len(half) == 2 and half[0] in (0, 2) and half[1] in (4, 6)
    assert prune_selfmax(phi, y, 0.0).tolist() == list(range(8))
