"""ToMe-style merging (Bolya et al., ICLR 2023) of the feature layer's tokens down to the budget.

Bipartite soft matching on the layer's keys (averaged over heads), repeated until the budget is
reached: tokens alternate between sides A and B, every A token proposes its most similar B token
(cosine), and the `r` most similar pairs merge. Merged tokens are size-weighted averages of
everything they absorbed (features and keys alike, so later rounds match on merged keys).
[CLS] is never merged away, as in ToMe, unless the budget leaves room for one token only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vlmzip._validation import check_int
from vlmzip.core import Reduction
from vlmzip.methods import register_method
from vlmzip.probe import ProbeOutput

if TYPE_CHECKING:
    from vlmzip.config import VisionZipConfig


@dataclass
class _Tokens:
    """The current (merged) tokens of a batch; every tensor is (B, n, ...)."""

    weighted: torch.Tensor  # features * size, so merging is a sum
    weighted_keys: torch.Tensor  # keys * size
    size: torch.Tensor  # (B, n, 1) how many original tokens each one holds
    first: torch.Tensor  # (B, n) smallest original index inside each token: the output order


def _expand_index(index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """(B, k) token index broadcast over the trailing dimensions of `values` (B, n, ...)."""
    return index.view(*index.shape, *([1] * (values.ndim - 2))).expand(*index.shape, *values.shape[2:])


def _take(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(1, _expand_index(index, values))


def _merge_round(tokens: _Tokens, assignment: torch.Tensor, r: int, protect_first: bool) -> _Tokens:
    """Merge `r` A tokens into their best B match; updates `assignment` (B, N) in place."""
    batch, n, _ = tokens.size.shape
    device = assignment.device
    keys = tokens.weighted_keys / tokens.size
    keys = keys / keys.norm(dim=-1, keepdim=True)
    similarity = keys[:, ::2] @ keys[:, 1::2].transpose(1, 2)  # (B, A, B)
    if protect_first:
        similarity[:, 0] = float("-inf")  # position 0 is [CLS] while protected
    best, best_b = similarity.max(dim=2)
    order = best.argsort(dim=1, descending=True)
    merged_a, kept_a = order[:, :r], order[:, r:].sort(dim=1).values
    target_b = best_b.gather(1, merged_a)

    def merge_sum(values: torch.Tensor) -> torch.Tensor:
        side_a, side_b = values[:, ::2], values[:, 1::2]
        moving = _take(side_a, merged_a)
        side_b = side_b.scatter_add(1, _expand_index(target_b, moving), moving)
        return torch.cat([_take(side_a, kept_a), side_b], dim=1)

    first_a, first_b = tokens.first[:, ::2], tokens.first[:, 1::2]
    first_b = first_b.scatter_reduce(1, target_b, first_a.gather(1, merged_a), reduce="amin")
    first = torch.cat([first_a.gather(1, kept_a), first_b], dim=1)

    # Where every old position went: kept A tokens first, then the B side (merged A tokens join their target).
    num_kept = kept_a.shape[1]
    a_positions = torch.arange(0, n, 2, device=device)
    b_positions = torch.arange(1, n, 2, device=device)
    rows = torch.arange(batch, device=device)[:, None]
    new_position = torch.empty(batch, n, dtype=torch.long, device=device)
    new_position[rows, a_positions[kept_a]] = torch.arange(num_kept, device=device).expand(batch, -1)
    new_position[rows, a_positions[merged_a]] = num_kept + target_b
    new_position[:, b_positions] = num_kept + torch.arange(b_positions.numel(), device=device)
    # Keep tokens sorted by their first original index, so the two sides stay spatially interleaved.
    order = first.argsort(dim=1)
    assignment.copy_(order.argsort(dim=1).gather(1, new_position.gather(1, assignment)))
    return _Tokens(
        weighted=_take(merge_sum(tokens.weighted), order),
        weighted_keys=_take(merge_sum(tokens.weighted_keys), order),
        size=_take(merge_sum(tokens.size), order),
        first=first.gather(1, order),
    )


def tome_merge(
    features: torch.Tensor, keys: torch.Tensor, target: int, *, protect_first: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge (B, N, hidden) `features` to `target` tokens by bipartite soft matching on `keys` (B, N, d).

    Returns (merged features (B, target, hidden) in the order of their first original token,
    assignment (B, N): the output token each input token ended up in, sizes (B, target)).
    """
    batch, num_tokens, _ = features.shape
    if keys.shape[:2] != (batch, num_tokens):
        raise ValueError(f"keys must be (B, N, d) = ({batch}, {num_tokens}, d), got {tuple(keys.shape)}")
    target = check_int("target", target, 1, num_tokens)
    device = features.device
    tokens = _Tokens(
        weighted=features.float(),
        weighted_keys=keys.float(),
        size=torch.ones(batch, num_tokens, 1, device=device),
        first=torch.arange(num_tokens, device=device).expand(batch, -1).clone(),
    )
    assignment = torch.arange(num_tokens, device=device).expand(batch, -1).clone()
    n = num_tokens
    while n > target:
        protect = protect_first and n > 2  # with two tokens left, the only move is into [CLS]'s partner
        r = min(n - target, (n + 1) // 2 - (1 if protect else 0))
        tokens = _merge_round(tokens, assignment, r, protect)
        n -= r
    merged = (tokens.weighted / tokens.size).to(features.dtype)
    return merged, assignment, tokens.size.squeeze(-1)


@register_method("tome")
def tome(probe: ProbeOutput, config: VisionZipConfig) -> Reduction:
    """Merge all tokens down to `dominant + contextual`; every output token is a group (no kept indices)."""
    features = probe.features
    tokens = check_int("dominant + contextual", config.tokens, 1, features.shape[1])
    merged, assignment, _ = tome_merge(features, probe.keys, tokens, protect_first=probe.has_cls)
    return Reduction(
        features=merged,
        kept_indices=torch.zeros(features.shape[0], 0, dtype=torch.long, device=features.device),
        groups=assignment,
        scores=probe.scores,
    )
