"""ToMe-style bipartite soft matching on keys, repeated down to the budget, size-weighted averages."""

from __future__ import annotations

import pytest
import torch

from methods.helpers import make_probe
from vlmzip.config import VisionZipConfig
from vlmzip.methods import get_method
from vlmzip.methods.tome import tome_merge


def reference_round(features: torch.Tensor, keys: torch.Tensor, r: int, protect_first: bool) -> list[set[int]]:
    """One ToMe round on one sequence of singleton tokens, as groups of original indices."""
    n = features.shape[0]
    normed = keys / keys.norm(dim=-1, keepdim=True)
    side_a, side_b = list(range(0, n, 2)), list(range(1, n, 2))
    best = {}
    for a in side_a:
        similarities = [(normed[a] @ normed[b]).item() for b in side_b]
        score = float("-inf") if protect_first and a == 0 else max(similarities)
        best[a] = (score, side_b[similarities.index(max(similarities))])
    merging = sorted(side_a, key=lambda a: -best[a][0])[:r]
    groups = {b: {b} for b in side_b}
    for a in merging:
        groups[best[a][1]].add(a)
    return [{a} for a in side_a if a not in merging] + list(groups.values())


def groups_of(assignment: torch.Tensor) -> list[set[int]]:
    return [set((assignment == j).nonzero().squeeze(1).tolist()) for j in range(int(assignment.max()) + 1)]


@pytest.mark.parametrize("protect_first", [True, False])
def test_one_round_matches_reference(protect_first):
    probe = make_probe(batch=2, side=5, seed=3)
    n = probe.features.shape[1]  # 26 tokens, 13 on side A
    _, assignment, _ = tome_merge(probe.features, probe.keys, n - 6, protect_first=protect_first)
    for row in range(2):
        expected = reference_round(probe.features[row], probe.keys[row], 6, protect_first)
        assert sorted(map(sorted, groups_of(assignment[row]))) == sorted(map(sorted, expected))


@pytest.mark.parametrize("has_cls", [True, False])
def test_repeated_rounds_reach_budget_with_size_weighted_means(has_cls):
    probe = make_probe(batch=2, side=8, has_cls=has_cls, seed=1)
    reduction = get_method("tome")(probe, VisionZipConfig(dominant=10, contextual=2, method="tome"))
    assert reduction.features.shape == (2, 12, 8)
    assert reduction.kept_indices.shape == (2, 0)
    for row in range(2):
        groups = groups_of(reduction.groups[row])
        assert len(groups) == 12 and all(groups)
        firsts = [min(group) for group in groups]
        assert firsts == sorted(firsts)  # output follows the first original token of each group
        for j, group in enumerate(groups):
            expected = probe.features[row, sorted(group)].mean(dim=0)  # every original token weighs the same
            torch.testing.assert_close(reduction.features[row, j], expected)
        if has_cls:
            assert groups[0] == {0}  # [CLS] is never merged


def test_identical_keys_merge_first():
    probe = make_probe(batch=1, side=4, has_cls=False, seed=2)
    keys = probe.keys.clone()
    keys[0, 7] = keys[0, 4] * 3  # same direction: cosine similarity 1
    _, assignment, sizes = tome_merge(probe.features, keys, 15, protect_first=False)
    assert assignment[0, 4] == assignment[0, 7]
    assert sorted(sizes[0].tolist()) == [1.0] * 14 + [2.0]


def test_edges():
    probe = make_probe(batch=1, side=3)
    merged, assignment, _ = tome_merge(probe.features, probe.keys, 10)
    torch.testing.assert_close(merged, probe.features)
    assert assignment[0].tolist() == list(range(10))
    single, assignment, sizes = tome_merge(probe.features, probe.keys, 1)
    torch.testing.assert_close(single[0, 0], probe.features[0].mean(dim=0))
    assert sizes.tolist() == [[10.0]]
    with pytest.raises(ValueError, match="target"):
        tome_merge(probe.features, probe.keys, 11)
    with pytest.raises(ValueError, match="keys"):
        tome_merge(probe.features, probe.keys[:, :5], 3)
