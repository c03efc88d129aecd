"""DivPrune (Alvar et al., CVPR 2025): keep the most diverse tokens, greedy max-min on cosine distance.

The first token kept is the most isolated one (largest distance to its nearest neighbour); every
next one is the token farthest from everything kept so far. No attention is used, so the method
works the same on towers with and without [CLS]; [CLS] competes like any other token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlmzip._validation import check_int
from vlmzip.core import Reduction, keep_only
from vlmzip.methods import register_method
from vlmzip.probe import ProbeOutput

if TYPE_CHECKING:
    from vlmzip.config import VisionZipConfig


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """Indices (B, count), ascending, of a greedy max-min diverse subset of each row of `features` (B, N, d)."""
    if not isinstance(features, torch.Tensor) or features.ndim != 3:
        raise ValueError(
            f"features must be a (batch, tokens, hidden) tensor, got {getattr(features, 'shape', features)}"
        )
    batch, num_tokens, _ = features.shape
    count = check_int("count", count, 1, num_tokens)
    normed = F.normalize(features.float(), dim=-1)
    distance = 1 - normed @ normed.transpose(1, 2)  # (B, N, N) cosine distance
    # A token's distance to itself must not count as its nearest neighbour.
    distance.diagonal(dim1=1, dim2=2).fill_(float("inf"))
    rows = torch.arange(batch, device=features.device)

    chosen = torch.zeros(batch, num_tokens, dtype=torch.bool, device=features.device)
    picks = torch.empty(batch, count, dtype=torch.long, device=features.device)
    picks[:, 0] = distance.min(dim=2).values.argmax(dim=1)
    chosen[rows, picks[:, 0]] = True
    nearest = distance[rows, picks[:, 0]]  # (B, N): distance of every token to the kept set
    for step in range(1, count):
        pick = nearest.masked_fill(chosen, float("-inf")).argmax(dim=1)
        picks[:, step] = pick
        chosen[rows, pick] = True
        nearest = torch.minimum(nearest, distance[rows, pick])
    return picks.sort(dim=1).values


@register_method("divprune")
def divprune(probe: ProbeOutput, config: VisionZipConfig) -> Reduction:
    """Keep `dominant + contextual` tokens chosen for diversity of the feature-layer output, in index order."""
    features = probe.features
    tokens = check_int("dominant + contextual", config.tokens, 1, features.shape[1])
    kept = max_min_diverse(features, tokens)
    return keep_only(features, kept, probe.scores)
