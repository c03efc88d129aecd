"""Literal references of the method, written out with plain loops over the tokens, for the family tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def reference_received_attention(queries: torch.Tensor, keys: torch.Tensor) -> list[float]:
    """The attention each token receives, written out with loops: per head softmax(q k^T / sqrt(d)) over the
    keys, its mean over the queries, summed over the heads. queries, keys: (heads, tokens, head_dim)."""
    heads, tokens, head_dim = keys.shape
    received = [0.0] * tokens
    for head in range(heads):
        probabilities = (queries[head] @ keys[head].T * head_dim**-0.5).softmax(dim=-1)
        for key in range(tokens):
            received[key] += float(probabilities[:, key].mean())
    return received


def reference_units(
    scores: Sequence[float], keys: Sequence[torch.Tensor], rows: int, cols: int, merge: int, first: int = 0
) -> tuple[list[float], list[torch.Tensor]]:
    """A rows x cols patch grid grouped into merge x merge units (raster order), written out with loops.

    A unit's score is the sum of its patches' scores, its key the mean of their keys; patch (r, c) sits at
    index `first + r * cols + c` of `scores` and `keys` (first = 1 after a [CLS] token).
    """
    unit_scores, unit_keys = [], []
    for row in range(rows // merge):
        for col in range(cols // merge):
            members = [first + (row * merge + a) * cols + col * merge + b for a in range(merge) for b in range(merge)]
            unit_scores.append(sum(scores[m] for m in members))
            unit_keys.append(torch.stack([keys[m] for m in members]).mean(dim=0))
    return unit_scores, unit_keys


def reference_visionzip(
    features: torch.Tensor, scores: Sequence[float], keys: Sequence[torch.Tensor], dominant: int, contextual: int
) -> torch.Tensor:
    """The published selection and merge, written out with plain loops over the tokens of one image.

    features (tokens, hidden), one score and one key per token (no [CLS]). Dominant: the `dominant`
    best-scored tokens, in index order. Contextual: evenly spaced targets among the rest; every other
    remaining token joins the target of highest cosine similarity (first wins ties); target + mean.
    """
    order = sorted(range(len(scores)), key=lambda token: -scores[token])
    kept = sorted(order[:dominant])
    remaining = [token for token in range(len(scores)) if token not in kept]
    step = max(1, len(remaining) // contextual) if contextual else 1
    targets = remaining[::step][:contextual]
    members: dict[int, list[int]] = {target: [] for target in targets}
    for token in remaining:
        if token in members:
            continue
        similarities = [float(torch.nn.functional.cosine_similarity(keys[token], keys[t], dim=0)) for t in targets]
        members[targets[similarities.index(max(similarities))]].append(token)
    tokens = [features[token] for token in kept]
    for target in targets:
        extra = torch.stack([features[m] for m in members[target]]).mean(dim=0) if members[target] else 0
        tokens.append(features[target] + extra)
    return torch.stack(tokens)
