"""2-D average pooling of the patch grid to the budget: the simple baseline every method must beat."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from vlmzip._validation import check_int
from vlmzip.core import GROUP_DROPPED, Reduction
from vlmzip.methods import register_method
from vlmzip.probe import ProbeOutput

if TYPE_CHECKING:
    from vlmzip.config import VisionZipConfig


def pooled_grid(tokens: int, rows: int, cols: int) -> tuple[int, int]:
    """(rows, cols) with rows * cols == tokens whose aspect ratio is closest to the patch grid's."""
    target = math.log(rows / cols)
    best = min(
        ((r, tokens // r) for r in range(1, tokens + 1) if tokens % r == 0 and r <= rows and tokens // r <= cols),
        key=lambda rc: abs(math.log(rc[0] / rc[1]) - target),
        default=None,
    )
    if best is None:
        raise ValueError(f"cannot pool a {rows}x{cols} patch grid to {tokens} tokens")
    return best


@register_method("pool")
def pool(probe: ProbeOutput, config: VisionZipConfig) -> Reduction:
    """Average-pool the patches to `dominant + contextual` tokens (prefix tokens such as [CLS] are dropped)."""
    features, prefix = probe.features, probe.num_prefix_tokens
    rows, cols = probe.grid
    tokens = check_int("dominant + contextual", config.tokens, 1, rows * cols)
    out_rows, out_cols = pooled_grid(tokens, rows, cols)
    batch, _, hidden = features.shape
    patches = features[:, prefix:].transpose(1, 2).reshape(batch, hidden, rows, cols)
    pooled = F.adaptive_avg_pool2d(patches.float(), (out_rows, out_cols)).to(features.dtype)
    # Each patch's group is the pooled cell it falls in (the same split adaptive pooling uses).
    row_cell = torch.arange(rows) * out_rows // rows
    col_cell = torch.arange(cols) * out_cols // cols
    cells = (row_cell[:, None] * out_cols + col_cell[None, :]).flatten().to(features.device)
    groups = torch.full((batch, features.shape[1]), GROUP_DROPPED, dtype=torch.long, device=features.device)
    groups[:, prefix:] = cells
    return Reduction(
        features=pooled.flatten(2).transpose(1, 2),
        kept_indices=torch.zeros(batch, 0, dtype=torch.long, device=features.device),
        groups=groups,
        scores=probe.scores,
    )
