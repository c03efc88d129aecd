"""What gets drawn: `ReducedImage` (an image as the tower saw it, and what a reduction did to its tokens),
built from images and reductions with the patch grid given or inferred."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from vlmzip.config import check_int
from vlmzip.core import Reduction


@dataclass(frozen=True)
class ReducedImage:
    """One image (or crop / frame) as the tower saw it, and what a reduction did to its tokens.

    image: the pixels the patch grid covers (for `reduce_image`: the processor's output).
    reduction: a `Reduction` of batch size 1.
    grid: (rows, cols) of the patch grid; patches follow `num_prefix_tokens` leading tokens in raster order.
    label: shown above the panel when there are several.
    """

    image: Image.Image
    reduction: Reduction
    grid: tuple[int, int]
    num_prefix_tokens: int
    label: str = ""

    @property
    def total_tokens(self) -> int:
        """Tokens the tower yields for this image."""
        return int(self.reduction.groups.shape[1])

    @property
    def kept_tokens(self) -> int:
        """Tokens that reach the language model: dominant + contextual."""
        return int(self.reduction.features.shape[1])

    @property
    def dominant(self) -> int:
        return int(self.reduction.kept_indices.shape[1])

    @property
    def contextual(self) -> int:
        return self.kept_tokens - self.dominant

    @property
    def kept_prefix_tokens(self) -> int:
        """Kept tokens that are not patches ([CLS], registers): they have no place on the grid."""
        return int((self.reduction.kept_indices[0] < self.num_prefix_tokens).sum())

    def patch_groups(self) -> np.ndarray:
        """(rows, cols) int array: GROUP_DOMINANT, GROUP_DROPPED or the contextual group of each patch."""
        rows, cols = self.grid
        groups = self.reduction.groups[0, self.num_prefix_tokens :]
        return groups.detach().cpu().numpy().astype(np.int64).reshape(rows, cols)

    def patch_scores(self) -> np.ndarray | None:
        """(rows, cols) float array of the selection scores over the patches, or None."""
        scores = self.reduction.scores
        rows, cols = self.grid
        if scores is None or scores.ndim != 2 or scores.shape[1] < rows * cols:
            return None
        # Patches are the last tokens in both layouts: [CLS]-row scores (N - 1) and received attention (N).
        return scores[0, -rows * cols :].detach().float().cpu().numpy().reshape(rows, cols)

    @property
    def score_name(self) -> str:
        scores = self.reduction.scores
        if scores is not None and scores.shape[1] == self.total_tokens:
            return "attention received"
        return "[CLS] attention"


def token_summary(panels: Sequence[ReducedImage]) -> str:
    """'64 of 577 tokens: 54 dominant + 10 contextual' (summed, with the panel count, for several)."""
    kept = sum(panel.kept_tokens for panel in panels)
    total = sum(panel.total_tokens for panel in panels)
    dominant = sum(panel.dominant for panel in panels)
    where = f" over {len(panels)} panels" if len(panels) > 1 else ""
    return f"{kept} of {total} tokens{where}: {dominant} dominant + {kept - dominant} contextual"


def split_reduction(reduction: Reduction) -> list[Reduction]:
    """One batch-1 Reduction per row of a batched one."""
    if not isinstance(reduction, Reduction):
        raise TypeError(f"result must be a visionzip Reduction (or a list of them), got {type(reduction).__name__}")
    rows = []
    for index in range(reduction.groups.shape[0]):
        part = slice(index, index + 1)
        rows.append(
            Reduction(
                features=reduction.features[part],
                kept_indices=reduction.kept_indices[part],
                groups=reduction.groups[part],
                scores=None if reduction.scores is None else reduction.scores[part],
            )
        )
    return rows


def resolve_layout(
    reduction: Reduction, grid: tuple[int, int] | None, num_prefix_tokens: int | None
) -> tuple[tuple[int, int], int]:
    """(grid, num_prefix_tokens) given or inferred: a square grid, prefix from the scores' length."""
    num_tokens = int(reduction.groups.shape[1])
    if grid is not None:
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in grid)
        ):
            raise ValueError(f"grid must be (rows, cols) of positive integers, got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    if num_prefix_tokens is None:
        if grid is not None:
            num_prefix_tokens = num_tokens - grid[0] * grid[1]
        elif reduction.scores is not None and reduction.scores.shape[1] in (num_tokens - 1, num_tokens):
            # [CLS]-row scores leave out exactly the [CLS] column; received attention covers every token.
            num_prefix_tokens = num_tokens - int(reduction.scores.shape[1])
        else:
            num_prefix_tokens = 1 if math.isqrt(num_tokens - 1) ** 2 == num_tokens - 1 else 0
    num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, 0, num_tokens - 1)
    if grid is None:
        side = math.isqrt(num_tokens - num_prefix_tokens)
        if side * side != num_tokens - num_prefix_tokens:
            raise ValueError(
                f"grid: cannot infer the patch grid of {num_tokens} tokens with {num_prefix_tokens} prefix tokens; "
                "pass grid=(rows, cols) and num_prefix_tokens"
            )
        grid = (side, side)
    if num_prefix_tokens + grid[0] * grid[1] != num_tokens:
        raise ValueError(
            f"grid {grid} with {num_prefix_tokens} prefix tokens does not match the reduction's {num_tokens} tokens"
        )
    return grid, num_prefix_tokens


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def as_panels(
    image: Any,
    result: Reduction | Sequence[Reduction] | None,
    grid: tuple[int, int] | None,
    num_prefix_tokens: int | None,
    labels: Sequence[str] | None,
) -> list[ReducedImage]:
    images = _as_list(image)
    if not images:
        raise ValueError("image must be an image or a non-empty list of images")
    if result is None:
        if not all(isinstance(item, ReducedImage) for item in images):
            raise TypeError("result is required unless image is a ReducedImage (or a list of them) from reduce_image")
        panels = images
    else:
        if not all(isinstance(item, Image.Image) for item in images):
            raise TypeError(
                f"image must be a PIL image or a list of them when result is given, got {type(images[0]).__name__}"
            )
        reductions = [row for reduction in _as_list(result) for row in split_reduction(reduction)]
        if len(reductions) != len(images):
            raise ValueError(
                f"result holds {len(reductions)} reduced images (crops / frames) but {len(images)} image(s) were given"
            )
        panels = []
        for picture, reduction in zip(images, reductions, strict=True):
            panel_grid, prefix = resolve_layout(reduction, grid, num_prefix_tokens)
            panels.append(ReducedImage(picture, reduction, panel_grid, prefix))
    if labels is not None:
        labels = [str(label) for label in _as_list(labels)]
        if len(labels) != len(panels):
            raise ValueError(f"labels must have one entry per panel ({len(panels)}), got {len(labels)}")
        panels = [
            ReducedImage(p.image, p.reduction, p.grid, p.num_prefix_tokens, label)
            for p, label in zip(panels, labels, strict=True)
        ]
    return panels
