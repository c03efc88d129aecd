"""Random selection to the budget (seeded): what any informed method must beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlmzip._validation import check_int
from vlmzip.core import GROUP_DOMINANT, GROUP_DROPPED, Reduction
from vlmzip.methods import register_method
from vlmzip.probe import ProbeOutput

if TYPE_CHECKING:
    from vlmzip.config import VisionZipConfig


@register_method("random")
def random_keep(probe: ProbeOutput, config: VisionZipConfig) -> Reduction:
    """Keep [CLS] (when present) plus uniformly drawn tokens, in ascending index order."""
    features = probe.features
    batch, num_tokens, hidden = features.shape
    tokens = check_int("dominant + contextual", config.tokens, 1, num_tokens)
    generator = torch.Generator().manual_seed(config.seed)
    keep_cls = 1 if probe.has_cls else 0
    draws = torch.rand(batch, num_tokens - keep_cls, generator=generator)
    drawn = draws.topk(tokens - keep_cls, dim=1).indices + keep_cls
    kept = torch.cat([torch.zeros(batch, keep_cls, dtype=torch.long), drawn], dim=1).sort(dim=1).values
    kept = kept.to(features.device)
    groups = torch.full((batch, num_tokens), GROUP_DROPPED, dtype=torch.long, device=features.device)
    groups.scatter_(1, kept, GROUP_DOMINANT)
    return Reduction(
        features=features.gather(1, kept.unsqueeze(-1).expand(-1, -1, hidden)),
        kept_indices=kept,
        groups=groups,
        scores=probe.scores,
    )
