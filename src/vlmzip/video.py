"""Temporal redundancy in videos: drop tokens that repeat the previous frame at the same position.

An optional step after VisionZip's per-frame reduction (`VisionZipConfig(temporal_threshold=...)`,
off by default), shared by every video family. A frame's dominant token is dropped when the token at
the same grid position in the previous frame is nearly identical (cosine similarity >= threshold):
with a static background, only what changes survives after the first frame. Contextual tokens are
merges without a single position and always stay. Frame 0 is never touched. Comparisons use the
unreduced tokens of both frames, so whether the previous frame kept that position does not matter.

The number of tokens per frame, and so per video, then varies with the content.
"""

from __future__ import annotations

import torch

from vlmzip._validation import check_fraction, check_tensor

# Identical tokens can come out of the cosine a few ulps below 1; a threshold of 1 still means identical.
COSINE_TOLERANCE = 1e-6


def redundant_tokens(frames: torch.Tensor, threshold: float) -> torch.Tensor:
    """(frames, tokens) bool: True where a token's cosine similarity with the same position of the previous
    frame is >= `threshold` (in (0, 1]). `frames` is (frames, tokens, hidden); frame 0 is all False.
    """
    frames = check_tensor("frames", frames, 3)
    threshold = check_fraction("threshold", threshold)
    redundant = torch.zeros(frames.shape[:2], dtype=torch.bool, device=frames.device)
    if frames.shape[0] > 1:
        similarity = torch.nn.functional.cosine_similarity(frames[1:].float(), frames[:-1].float(), dim=-1)
        redundant[1:] = similarity >= threshold - COSINE_TOLERANCE
    return redundant


def temporal_keep_mask(
    frames: torch.Tensor, kept_indices: torch.Tensor, tokens_per_frame: int, threshold: float
) -> torch.Tensor:
    """Which of each frame's reduced tokens survive the temporal step, (frames, tokens_per_frame) bool.

    frames: (frames, tokens, hidden) the unreduced tokens, in the positions `kept_indices` refers to.
    kept_indices: (frames, dominant) positions of each frame's dominant tokens; the reduced tokens of a
        frame are its dominant tokens (in that order) followed by `tokens_per_frame - dominant` merged ones.
    """
    kept_indices = check_tensor("kept_indices", kept_indices, 2)
    redundant = redundant_tokens(frames, threshold)
    if kept_indices.shape[0] != frames.shape[0]:
        raise ValueError(f"kept_indices has {kept_indices.shape[0]} frames, frames has {frames.shape[0]}")
    dominant = kept_indices.shape[1]
    if tokens_per_frame < dominant:
        raise ValueError(
            f"tokens_per_frame must be >= the dominant tokens per frame ({dominant}), got {tokens_per_frame}"
        )
    keep = torch.ones(frames.shape[0], tokens_per_frame, dtype=torch.bool, device=frames.device)
    keep[:, :dominant] = ~redundant.gather(1, kept_indices.to(frames.device))
    return keep
