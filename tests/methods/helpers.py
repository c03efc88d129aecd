"""Small synthetic probe outputs for the method tests."""

from __future__ import annotations

import torch

from vlmzip.probe import ProbeOutput


def make_probe(batch: int = 2, side: int = 6, hidden: int = 8, head_dim: int = 4, has_cls: bool = True, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    num_tokens = side * side + (1 if has_cls else 0)
    return ProbeOutput(
        features=torch.randn(batch, num_tokens, hidden, generator=generator),
        scores=torch.rand(batch, num_tokens - (1 if has_cls else 0), generator=generator),
        keys=torch.randn(batch, num_tokens, head_dim, generator=generator),
        has_cls=has_cls,
        num_prefix_tokens=1 if has_cls else 0,
        grid=(side, side),
    )
