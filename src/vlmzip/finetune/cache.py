"""The reduced-feature cache: each image's reduction computed once, served in place of the tower afterwards.

The tower is frozen and its reduced output does not depend on the projector, so a training step
then runs only projector + language model. Batches in that mode carry shape-only `pixel_values`
(the adapter reads their shape to count placeholders) and the images' cache keys (`IMAGE_KEYS`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from vlmzip.core import Reduction
from vlmzip.finetune.examples import Example


class ReducedFeatureCache:
    """Each image's reduction, computed once by the adapter's own `reduce` and served in its place.

    Given to the adapter's `reductions_from`, it answers for the images named by `serving(keys)`: the
    pixel_values of those batches are shape-only stand-ins (`stand_in_pixels`).
    """

    def __init__(self) -> None:
        self._rows: list[Reduction] = []
        self._pixel_shapes: list[torch.Size] = []
        self._serving: list[int] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, reduction: Reduction, pixel_values: torch.Tensor) -> list[int]:
        """Store one reduced batch row by row; returns the rows' keys."""
        keys = []
        for row in range(reduction.features.shape[0]):
            keys.append(len(self._rows))
            scores = reduction.scores[row].detach().cpu() if reduction.scores is not None else None
            self._rows.append(
                Reduction(
                    features=reduction.features[row].detach().cpu(),
                    kept_indices=reduction.kept_indices[row].detach().cpu(),
                    groups=reduction.groups[row].detach().cpu(),
                    scores=scores,
                )
            )
            self._pixel_shapes.append(pixel_values.shape[1:])
        return keys

    def stand_in_pixels(self, keys: Sequence[int]) -> torch.Tensor:
        """Shape-only pixel_values for these images (no memory: one element, expanded)."""
        shapes = {self._pixel_shapes[key] for key in keys}
        if len(shapes) != 1:
            raise ValueError(f"images of one batch must share one pixel shape, got {sorted(map(tuple, shapes))}")
        return torch.zeros(()).expand(len(keys), *shapes.pop())

    @contextmanager
    def serving(self, keys: Sequence[int]) -> Iterator[None]:
        self._serving = list(keys)
        try:
            yield
        finally:
            self._serving = None

    def reduction_for(self, pixel_values: torch.Tensor) -> Reduction:
        """The cached reduction of the images `serving(keys)` names (`pixel_values`: their shape-only stand-in)."""
        keys = self._serving
        if keys is None or len(keys) != pixel_values.shape[0]:
            raise RuntimeError(
                "the reduced-feature cache was asked for images it was not told about; "
                "batches need their image keys (or train with cache_features=False)"
            )
        rows = [self._rows[key] for key in keys]
        device = pixel_values.device
        scores = [row.scores for row in rows]
        return Reduction(
            features=torch.stack([row.features for row in rows]).to(device),
            kept_indices=torch.stack([row.kept_indices for row in rows]).to(device),
            groups=torch.stack([row.groups for row in rows]).to(device),
            scores=torch.stack(scores).to(device) if all(s is not None for s in scores) else None,
        )


def cache_serves_like_tower(adapter: Any, cache: ReducedFeatureCache, example: Example, pixels: torch.Tensor) -> bool:
    """Prepare one example through the tower and through the cache: the model inputs must agree.

    `pixels` are the pixel_values of the example's image. Guards families whose `encode` needs more
    than the reduction (the cache serves no probe).
    """
    inputs = {"input_ids": example.input_ids[None], "attention_mask": torch.ones_like(example.input_ids)[None]}
    with torch.no_grad():
        expected = adapter.prepare({**inputs, "pixel_values": pixels})
        try:
            with adapter.reductions_from(cache.reduction_for), cache.serving([example.image]):
                served = adapter.prepare({**inputs, "pixel_values": cache.stand_in_pixels([example.image])})
        except (RuntimeError, ValueError, TypeError, AttributeError):  # e.g. an encode() that needs the probe
            return False
    if expected.keys() != served.keys():
        return False
    for key, value in expected.items():
        if isinstance(value, torch.Tensor) and not torch.equal(value, served[key]):
            return False
    modality = adapter.modality
    pairs = zip(
        expected["mm_encoder_outputs"][modality].pooler_output,
        served["mm_encoder_outputs"][modality].pooler_output,
        strict=True,
    )
    return all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs)
