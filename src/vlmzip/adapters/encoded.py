"""EncodedImages: what a family's `encode()` returns (reduced, projected features per image)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vlmzip.core import Reduction


@dataclass
class EncodedImages:
    """Reduced, projected features of every image in a batch, in placeholder order.

    features: one (tokens_i, text_hidden) tensor per image, as the language model receives it.
    full_counts: placeholders the processor emitted for each image.
    slots: for each image, which placeholder positions (within its run, ascending) the reduced
        tokens occupy; None keeps the first `tokens_i` positions. Families whose position ids
        depend on the slot (M-RoPE) set it.
    reductions: the core's per-batch results (per unit with an adaptive budget), for visualisation
        and inspection.
    positions: for each image, the placeholder (within its run, 0-based) whose position id every
        reduced token takes under `positions="original"` (see `Adapter.position_ids`); None when
        the family does not provide it.
    """

    features: list[torch.Tensor]
    full_counts: list[int]
    slots: list[torch.Tensor] | None = None
    reductions: list[Reduction] = field(default_factory=list)
    positions: list[torch.Tensor] | None = None
