"""LLaVA-1.5 (`LlavaForConditionalGeneration`): one tower pass per image, one projector."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from vlmzip.adapters.base import Adapter, EncodedImages


class LlavaAdapter(Adapter):
    families = ("LlavaForConditionalGeneration",)
    image_input_keys = ("pixel_values",)

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    def _drops_cls(self) -> bool:
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
        per_image = self.tower_info.num_tokens(height, width) - (1 if self._drops_cls() else 0)
        return [per_image] * pixel_values.shape[0]

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        pixel_values = inputs["pixel_values"]
        _, reduction = self.reduce(pixel_values)
        projected = self.projector()(reduction.features)
        return EncodedImages(
            features=list(projected.unbind(0)),
            full_counts=self.full_counts(inputs),
            reductions=[reduction],
        )
