"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one tower pass per image, one projector.

Original positions: tower token i held placeholder i of its image's run (i - 1 under the "default"
feature strategy, which drops [CLS]; a kept [CLS] then takes the first placeholder's position).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlmzip.adapters.base import Adapter, EncodedImages, reduction_list
from vlmzip.adapters.parts import TowerAndProjector
from vlmzip.cache import VisualUnit


class LlavaAdapter(TowerAndProjector, Adapter):
    families = ("LlavaForConditionalGeneration",)
    image_input_keys = ("pixel_values",)
    supports_original_positions = True
    supports_adaptive = True

    @property
    def drops_cls(self) -> bool:
        # "default" drops [CLS] from the full feature sequence, so the processor emits one fewer placeholder.
        return getattr(self.model.config, "vision_feature_select_strategy", "default") == "default"

    def tokens_per_unit(self) -> int:
        """At the processor's input size where known (the embedded DINOv2 model: 336 px, though its
        tower config says 518), else at the tower config's image_size."""
        size = self.input_size()
        if size is not None:
            return self.tower_info.num_tokens(*size)
        vision_config = self.model.config.vision_config
        side = int(vision_config.image_size) // self.tower_info.patch_size
        return self.tower_info.num_prefix_tokens + side * side

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        pixel_values = inputs["pixel_values"]
        if getattr(pixel_values, "ndim", None) != 4:
            raise ValueError(
                "inputs['pixel_values'] must be a (images, channels, height, width) tensor, got "
                f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
            )
        height, width = pixel_values.shape[-2:]
        per_image = self.placeholders_for(self.tower_info.num_tokens(height, width))
        return [per_image] * pixel_values.shape[0]

    def placeholder_of(self, anchors: torch.Tensor) -> torch.Tensor:
        """The placeholder (within the image's run) of each tower token index in `anchors`."""
        return (anchors - (1 if self.drops_cls else 0)).clamp(min=0)

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        pixel_values = inputs["pixel_values"]
        _, reduced = self.reduce(pixel_values)
        reductions = reduction_list(reduced)  # adaptive budget: one per image, of its own length
        features = [image for reduction in reductions for image in self.projector()(reduction.features).unbind(0)]
        anchors = self.anchor_rows(reductions)
        return EncodedImages(
            features=features,
            full_counts=self.full_counts(inputs),
            reductions=reductions,
            positions=None if anchors is None else [self.placeholder_of(row) for row in anchors],
        )

    def visual_units(self, inputs: Mapping[str, Any]) -> list[VisualUnit]:
        counts = self.full_counts(inputs)
        pixel_values = inputs["pixel_values"]
        return [
            VisualUnit("image", (pixels,), (), count, self.image_token_id)
            for pixels, count in zip(pixel_values, counts, strict=True)
        ]

    def units_inputs(self, units: Sequence[VisualUnit]) -> dict[str, Any]:
        return {"pixel_values": torch.stack([unit.tensors[0] for unit in units])}
