"""VisionZip selection and merging as pure tensor functions.

No model knowledge lives here: tensors in, tensors out. Shapes:
  features  (B, N, hidden)  output of the feature layer, [CLS] (if any) at index 0
  scores    (B, N - 1)      [CLS]-row attention to each patch, summed over heads (towers with [CLS])
            (B, N)          attention each token receives (towers without [CLS])
  keys      (B, N, d)       the feature layer's keys, averaged over heads
Every function is vectorised over the batch and works on any float dtype and device.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmzip._validation import MERGE_MODES, check_int, check_tensor

# Values of `Reduction.groups` for tokens that are not merged into a contextual token.
GROUP_DOMINANT = -1
GROUP_DROPPED = -2


@dataclass
class Reduction:
    """Result of reducing one batch of token sequences.

    Attributes:
        features: (B, dominant + contextual, hidden) dominant tokens in ascending index order,
            then the contextual tokens.
        kept_indices: (B, dominant) int64, ascending indices of the dominant tokens (0 = [CLS] when present).
        groups: (B, N) int64; GROUP_DOMINANT (-1) for kept tokens, j >= 0 for tokens merged into
            contextual token j (targets included), GROUP_DROPPED (-2) for tokens discarded.
        scores: the per-token scores the selection used (same shape as given), for visualisation.
    """

    features: torch.Tensor
    kept_indices: torch.Tensor
    groups: torch.Tensor
    scores: torch.Tensor | None = None

    @classmethod
    def cat(cls, reductions: Sequence[Reduction]) -> Reduction:
        """One batch of the rows of `reductions`, in order (their token counts must agree)."""
        reductions = batches_to_cat(reductions, Reduction, "reductions")
        shapes = {(r.features.shape[1:], r.kept_indices.shape[1:], r.groups.shape[1:]) for r in reductions}
        if len(shapes) > 1:
            counts = sorted({(r.features.shape[1], r.kept_indices.shape[1], r.groups.shape[1]) for r in reductions})
            raise ValueError(f"reductions must agree in (tokens, kept, grouped) counts and width, got {counts}")
        scores = [r.scores for r in reductions]
        return cls(
            features=torch.cat([r.features for r in reductions]),
            kept_indices=torch.cat([r.kept_indices for r in reductions]),
            groups=torch.cat([r.groups for r in reductions]),
            scores=None if any(score is None for score in scores) else torch.cat(scores),
        )

    def __getitem__(self, rows: BatchRows) -> Reduction:
        """The rows `rows` of the batch (an int keeps its batch dimension: one row)."""
        return Reduction(
            features=batch_rows(self.features, rows),
            kept_indices=batch_rows(self.kept_indices, rows),
            groups=batch_rows(self.groups, rows),
            scores=batch_rows(self.scores, rows) if self.scores is not None else None,
        )

    def split(self) -> list[Reduction]:
        """One single-row Reduction per row of the batch (views, no copies)."""
        return [self[row] for row in range(self.features.shape[0])]


BatchRows = int | slice | Sequence[int] | torch.Tensor


def batches_to_cat(items: Any, kind: type, name: str) -> list:
    """`items` as a list, refused unless it is a non-empty sequence of `kind` (the argument of a `cat`)."""
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"{name} must be a non-empty sequence of {kind.__name__}, got {type(items).__name__}")
    items = list(items)
    if not items or not all(isinstance(item, kind) for item in items):
        raise ValueError(f"{name} must be a non-empty sequence of {kind.__name__}")
    return items


def batch_rows(values: torch.Tensor, rows: BatchRows) -> torch.Tensor:
    """`values[rows]` along the batch dimension, kept 2-D or more: an int gives one row, a slice a view,
    a sequence or tensor of indices (or a bool mask) a copy of those rows in that order."""
    valid = isinstance(rows, (int, slice)) and not isinstance(rows, bool)
    if isinstance(rows, torch.Tensor):
        valid = rows.dtype == torch.bool or not (rows.dtype.is_floating_point or rows.dtype.is_complex)
    elif isinstance(rows, Sequence) and not isinstance(rows, (str, bytes)):
        # Integer indices, or a bool per row (a mask); not a mix of the two.
        valid = all(isinstance(row, bool) for row in rows) or not any(
            isinstance(row, bool) or not isinstance(row, int) for row in rows
        )
    if not valid:
        raise TypeError(
            "rows must be an int, a slice, or a sequence / tensor of integer indices (or a bool mask), "
            f"got {type(rows).__name__} {str(rows)[:80]}"
        )
    if isinstance(rows, int):
        size = values.shape[0]
        if not -size <= rows < size:
            raise IndexError(f"row {rows} is out of range for a batch of {size}")
        rows = slice(rows % size, rows % size + 1)
    if isinstance(rows, slice):
        return values[rows]
    if not isinstance(rows, torch.Tensor):
        rows = list(rows)
        mask = bool(rows) and all(isinstance(row, bool) for row in rows)
        rows = torch.tensor(rows, dtype=torch.bool if mask else torch.long)
    if rows.dtype != torch.bool:
        rows = rows.long()
    return values[rows.to(values.device)]


def select_dominant(scores: torch.Tensor, dominant: int, *, has_cls: bool = True) -> torch.Tensor:
    """Indices (B, dominant) of the dominant tokens, ascending.

    With [CLS], `scores` is (B, N - 1) over the patches; [CLS]'s slot 0 is always kept and counts
    towards `dominant`, the top `dominant - 1` patches fill the rest. Without [CLS], `scores` is
    (B, N) and the top `dominant` tokens are kept. Ties are broken as `torch.topk` breaks them.
    """
    scores = check_tensor("scores", scores, 2)
    num_tokens = scores.shape[1] + (1 if has_cls else 0)
    dominant = check_int("dominant", dominant, 1, num_tokens)
    if has_cls:
        top = scores.topk(dominant - 1, dim=1).indices + 1
        cls_slot = torch.zeros(scores.shape[0], 1, dtype=top.dtype, device=top.device)
        kept = torch.cat([cls_slot, top], dim=1)
    else:
        kept = scores.topk(dominant, dim=1).indices
    return kept.sort(dim=1).values


def contextual_targets(num_remaining: int, contextual: int) -> torch.Tensor:
    """Positions (within the remaining tokens) of the evenly spaced merge targets."""
    step = max(1, num_remaining // contextual)
    return torch.arange(0, num_remaining, step)[:contextual]


def merge_contextual(
    features: torch.Tensor,
    keys: torch.Tensor,
    kept_indices: torch.Tensor,
    contextual: int,
    *,
    merge: str = "target_plus_mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge the tokens not in `kept_indices` into `contextual` tokens.

    The remaining tokens (ascending index order) are split into evenly spaced targets and the rest;
    each of the rest joins the target whose key is most similar (cosine, first index wins ties).
    Returns the contextual tokens (B, contextual, hidden) and the group of every token (B, N).
    """
    batch, num_tokens, hidden = features.shape
    num_remaining = num_tokens - kept_indices.shape[1]
    contextual = check_int("contextual", contextual, 0, num_remaining)
    if merge not in MERGE_MODES:
        raise ValueError(f"merge must be one of {MERGE_MODES}, got {merge!r}")
    device = features.device

    remaining_mask = torch.ones(batch, num_tokens, dtype=torch.bool, device=device)
    remaining_mask.scatter_(1, kept_indices, False)
    # nonzero() walks rows in order, so each row's remaining indices come out ascending.
    remaining = remaining_mask.nonzero()[:, 1].view(batch, num_remaining)
    groups = torch.full((batch, num_tokens), GROUP_DOMINANT, dtype=torch.long, device=device)
    if contextual == 0:
        groups.scatter_(1, remaining, GROUP_DROPPED)
        return features.new_zeros(batch, 0, hidden), groups

    metric = keys.gather(1, remaining.unsqueeze(-1).expand(-1, -1, keys.shape[-1]))
    metric = metric / metric.norm(dim=-1, keepdim=True)
    remaining_features = features.gather(1, remaining.unsqueeze(-1).expand(-1, -1, hidden))

    targets = contextual_targets(num_remaining, contextual).to(device)
    is_target = torch.zeros(num_remaining, dtype=torch.bool, device=device)
    is_target[targets] = True
    sources = (~is_target).nonzero().squeeze(1)

    similarity = torch.bmm(metric[:, sources], metric[:, targets].transpose(1, 2))  # (B, sources, targets)
    assignment = similarity.argmax(dim=2)
    one_hot = torch.zeros(batch, sources.numel(), contextual, dtype=features.dtype, device=device)
    one_hot.scatter_(2, assignment.unsqueeze(-1), 1)
    assigned_count = one_hot.sum(dim=1).unsqueeze(-1)  # (B, contextual, 1)
    assigned_sum = torch.bmm(one_hot.transpose(1, 2), remaining_features[:, sources])
    target_features = remaining_features[:, targets]
    if merge == "target_plus_mean":
        # The published behaviour: the target plus the mean of what joined it (0 when nothing did).
        contextual_tokens = target_features + assigned_sum / assigned_count.clamp(min=1)
    else:
        contextual_tokens = (target_features + assigned_sum) / (assigned_count + 1)

    target_ids = torch.arange(contextual, device=device).expand(batch, -1)
    groups.scatter_(1, remaining[:, targets], target_ids)
    groups.scatter_(1, remaining[:, sources], assignment)
    return contextual_tokens, groups


def visionzip_reduce(
    features: torch.Tensor,
    scores: torch.Tensor,
    keys: torch.Tensor,
    dominant: int,
    contextual: int,
    *,
    has_cls: bool = True,
    merge: str = "target_plus_mean",
) -> Reduction:
    """VisionZip: keep `dominant` tokens by attention and merge the rest into `contextual` tokens.

    Output per sequence: `dominant + contextual` tokens, the dominant ones first in ascending index
    order ([CLS] first when present), then the contextual ones. Requires dominant + contextual <= N;
    when equal, nothing is merged and every token is returned (dominant first).
    """
    features = check_tensor("features", features, 3)
    keys = check_tensor("keys", keys, 3)
    scores = check_tensor("scores", scores, 2)
    batch, num_tokens, _ = features.shape
    expected_scores = num_tokens - 1 if has_cls else num_tokens
    if keys.shape[:2] != (batch, num_tokens):
        raise ValueError(f"keys must be (B, N, d) = ({batch}, {num_tokens}, d), got {tuple(keys.shape)}")
    if tuple(scores.shape) != (batch, expected_scores):
        raise ValueError(
            f"scores must be ({batch}, {expected_scores}) for a tower {'with' if has_cls else 'without'} "
            f"[CLS], got {tuple(scores.shape)}"
        )
    dominant = check_int("dominant", dominant, 1, num_tokens)
    contextual = check_int("contextual", contextual, 0, num_tokens - dominant)

    kept = select_dominant(scores, dominant, has_cls=has_cls)
    dominant_tokens = features.gather(1, kept.unsqueeze(-1).expand(-1, -1, features.shape[-1]))
    contextual_tokens, groups = merge_contextual(features, keys, kept, contextual, merge=merge)
    return Reduction(
        features=torch.cat([dominant_tokens, contextual_tokens], dim=1),
        kept_indices=kept,
        groups=groups,
        scores=scores,
    )


def keep_only(features: torch.Tensor, kept_indices: torch.Tensor, scores: torch.Tensor | None = None) -> Reduction:
    """A Reduction that keeps the tokens at `kept_indices` (B, tokens), ascending, and drops all others."""
    batch, num_tokens, hidden = features.shape
    groups = torch.full((batch, num_tokens), GROUP_DROPPED, dtype=torch.long, device=features.device)
    groups.scatter_(1, kept_indices, GROUP_DOMINANT)
    return Reduction(
        features=features.gather(1, kept_indices.unsqueeze(-1).expand(-1, -1, hidden)),
        kept_indices=kept_indices,
        groups=groups,
        scores=scores,
    )


def adaptive_dominant(
    scores: torch.Tensor,
    attention_mass: float,
    *,
    has_cls: bool = True,
    minimum: int = 1,
    maximum: int | None = None,
) -> torch.Tensor:
    """Dominant tokens (B,) each row needs for its top-scoring tokens to hold `attention_mass` of its scores.

    Tokens are taken in descending score order until their share of the row's total reaches
    `attention_mass`; with [CLS] (`scores` (B, N - 1) over the patches) its own slot is added, as
    `select_dominant` counts it. The count is clamped to [minimum, maximum] (maximum None: N).
    """
    scores = check_tensor("scores", scores, 2)
    num_tokens = scores.shape[1] + (1 if has_cls else 0)
    minimum = check_int("min_dominant", minimum, 1, num_tokens)
    maximum = num_tokens if maximum is None else min(check_int("max_dominant", maximum, minimum), num_tokens)
    ranked = scores.float().clamp(min=0).sort(dim=1, descending=True).values
    total = ranked.sum(dim=1, keepdim=True)
    share = ranked.cumsum(dim=1) / total.clamp(min=torch.finfo(torch.float32).tiny)
    needed = (share < attention_mass).sum(dim=1) + 1  # tokens until the share is reached
    needed = torch.where(total.squeeze(1) > 0, needed, torch.ones_like(needed))
    return (needed + (1 if has_cls else 0)).clamp(min=minimum, max=maximum)


def anchor_indices(reduction: Reduction) -> torch.Tensor:
    """(B, tokens) int64: for each reduced token, the input token whose place it takes.

    A dominant (kept) token takes its own index. Contextual token j takes the token it was merged
    onto: VisionZip's evenly spaced target (`contextual_targets` over the tokens not kept); for
    methods whose groups have no target (pooling, ToMe), the group's first token in index order.
    Position schemes use it: the reduced token sits where its anchor sat in the unreduced sequence.
    """
    kept = reduction.kept_indices
    num_contextual = reduction.features.shape[1] - kept.shape[1]
    if num_contextual == 0:
        return kept
    rows = []
    for row in range(kept.shape[0]):
        groups = reduction.groups[row]
        remaining = (groups != GROUP_DOMINANT).nonzero().squeeze(1)
        targets = remaining[contextual_targets(remaining.numel(), num_contextual).to(remaining.device)]
        anchors = []
        for group in range(num_contextual):
            target = targets[group] if group < targets.numel() else None
            if target is not None and int(groups[target]) == group:
                anchors.append(target)
                continue
            members = (groups == group).nonzero()
            if members.numel() == 0:
                raise RuntimeError(f"contextual token {group} has no merged token to take its position from")
            anchors.append(members[0, 0])
        rows.append(torch.cat([kept[row], torch.stack(anchors).to(kept.dtype)]))
    return torch.stack(rows)
