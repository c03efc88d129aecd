"""DivPrune: greedy max-min diverse selection on cosine distance of the feature-layer output."""

from __future__ import annotations

import pytest
import torch

from methods.helpers import make_probe
from vlmzip.config import VisionZipConfig
from vlmzip.core import GROUP_DOMINANT, GROUP_DROPPED
from vlmzip.methods import get_method
from vlmzip.methods.divprune import max_min_diverse


def reference_divprune(features: torch.Tensor, count: int) -> list[int]:
    """The published algorithm, one sequence at a time, written as plainly as possible."""
    normed = features / features.norm(dim=-1, keepdim=True)
    distance = 1 - normed @ normed.T
    n = features.shape[0]
    nearest_other = [min(distance[i, j].item() for j in range(n) if j != i) for i in range(n)]
    selected = [max(range(n), key=lambda i: nearest_other[i])]
    while len(selected) < count:
        remaining = [i for i in range(n) if i not in selected]
        selected.append(max(remaining, key=lambda i: min(distance[i, j].item() for j in selected)))
    return sorted(selected)


@pytest.mark.parametrize("has_cls", [True, False])
def test_budget_order_and_groups(has_cls):
    probe = make_probe(has_cls=has_cls)
    reduction = get_method("divprune")(probe, VisionZipConfig(dominant=9, contextual=3, method="divprune"))
    assert reduction.features.shape == (2, 12, 8)
    kept = reduction.kept_indices
    assert kept.shape == (2, 12)
    assert torch.equal(kept, kept.sort(dim=1).values)
    assert all(row.unique().numel() == 12 for row in kept)
    torch.testing.assert_close(reduction.features, probe.features.gather(1, kept[..., None].expand(-1, -1, 8)))
    assert ((reduction.groups == GROUP_DOMINANT).sum(dim=1) == 12).all()
    assert ((reduction.groups == GROUP_DROPPED).sum(dim=1) == probe.features.shape[1] - 12).all()


def test_matches_reference_algorithm():
    probe = make_probe(batch=3, side=5, seed=4)
    kept = max_min_diverse(probe.features, 7)
    for row in range(3):
        assert kept[row].tolist() == reference_divprune(probe.features[row], 7)


def test_picks_one_token_per_cluster():
    # Three tight clusters of near-duplicates: a diverse set of three takes one from each.
    directions = torch.eye(3)
    generator = torch.Generator().manual_seed(0)
    features = directions.repeat_interleave(5, dim=0) + 0.01 * torch.randn(15, 3, generator=generator)
    kept = max_min_diverse(features[None], 3)[0]
    assert sorted((kept // 5).tolist()) == [0, 1, 2]


def test_whole_sequence_and_bad_budgets():
    probe = make_probe(side=3)
    assert max_min_diverse(probe.features, 10).tolist() == [list(range(10))] * 2
    with pytest.raises(ValueError, match=r"dominant \+ contextual must be an integer in \[1, 10\]"):
        get_method("divprune")(probe, VisionZipConfig(dominant=10, contextual=1, method="divprune"))
    with pytest.raises(ValueError, match="count"):
        max_min_diverse(probe.features, 0)
    with pytest.raises(ValueError, match="features"):
        max_min_diverse(probe.features[0], 2)
