"""Random selection to the budget (seeded): what any informed method must beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from vlmzip._validation import check_int
from vlmzip.core import Reduction, keep_only
from vlmzip.methods import register_method
from vlmzip.probe import ProbeOutput

if TYPE_CHECKING:
    from vlmzip.config import VisionZipConfig


@register_method("random")
def random_keep(probe: ProbeOutput, config: VisionZipConfig) -> Reduction:
    """Keep [CLS] (when present) plus uniformly drawn tokens, in ascending index order."""
    features = probe.features
    batch, num_tokens = features.shape[:2]
    tokens = check_int("dominant + contextual", config.tokens, 1, num_tokens)
    generator = torch.Generator().manual_seed(config.seed)
    keep_cls = 1 if probe.has_cls else 0
    draws = torch.rand(batch, num_tokens - keep_cls, generator=generator)
    drawn = draws.topk(tokens - keep_cls, dim=1).indices + keep_cls
    kept = torch.cat([torch.zeros(batch, keep_cls, dtype=torch.long), drawn], dim=1).sort(dim=1).values
    kept = kept.to(features.device)
    return keep_only(features, kept, probe.scores)
