"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): AnyRes crops, every crop reduced alike.

The processor splits an image into a base crop (the whole image, resized) plus a grid of crops and
emits one placeholder per packed feature (unpadded grid plus one newline per row). VisionZip reduces
every crop independently with the same (dominant, contextual) and lays the tokens out as the paper's
reference implementation does (`anyres_layout`):

  base crop: its dominant + contextual tokens, unchanged;
  grid crops: their dominant patch tokens put back into the stitched 2-D grid of all crops and read
  row-major over the whole grid (no unpadding, no newline tokens); then each crop's prefix tokens
  ([CLS]) in crop order; then all crops' contextual tokens in crop order.

An image with `crops` crops (base included) sends `crops * (dominant + contextual)` tokens with
budget_scope="per_crop", or at most `dominant + contextual` with budget_scope="per_image"
(`VisionZipConfig.per_unit`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches

from vlmzip.adapters.base import Adapter, EncodedImages
from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction
from vlmzip.probe import ProbeOutput, probe_vision_tower


def anyres_layout(
    features: torch.Tensor,
    kept_indices: torch.Tensor,
    crop_grid: tuple[int, int],
    patch_grid: tuple[int, int],
    num_prefix_tokens: int,
) -> torch.Tensor:
    """One image's reduced crops in the reference AnyRes order, as (tokens, hidden).

    features: (crops, dominant + contextual, hidden), the base crop first, then the grid crops
        row-major over `crop_grid` (rows, cols); each row holds its dominant tokens first (as many
        as `kept_indices` has columns), then its contextual tokens.
    kept_indices: (crops, dominant) ascending token indices of the dominant tokens in their crop.
    patch_grid: (rows, cols) of patches in one crop; patches follow `num_prefix_tokens` tokens.
    """
    if features.shape[0] == 1:
        return features[0]
    grid_crops = features[1:]
    kept = kept_indices[1:]
    dominant = kept.shape[1]
    crop_rows, crop_cols = crop_grid
    patch_rows, patch_cols = patch_grid
    if grid_crops.shape[0] != crop_rows * crop_cols:
        raise ValueError(f"got {grid_crops.shape[0]} grid crops for a {crop_rows}x{crop_cols} crop grid")
    is_prefix = kept < num_prefix_tokens
    # Position of every dominant patch in the stitched (crop_rows * patch_rows) x (crop_cols * patch_cols) grid.
    patch = (kept - num_prefix_tokens).clamp(min=0)
    crop = torch.arange(kept.shape[0], device=kept.device).unsqueeze(1)
    row = (crop // crop_cols) * patch_rows + patch // patch_cols
    col = (crop % crop_cols) * patch_cols + patch % patch_cols
    stitched_index = row * (crop_cols * patch_cols) + col
    patch_tokens = grid_crops[:, :dominant][~is_prefix]
    order = stitched_index[~is_prefix].argsort(stable=True)
    return torch.cat(
        [
            features[0],
            patch_tokens[order],
            grid_crops[:, :dominant][is_prefix],  # boolean indexing keeps crop order
            grid_crops[:, dominant:].flatten(0, 1),
        ]
    )


def slice_probe(probe: ProbeOutput, start: int, end: int) -> ProbeOutput:
    """The probe of crops `start:end` of a batch."""
    return ProbeOutput(
        features=probe.features[start:end],
        scores=probe.scores[start:end],
        keys=probe.keys[start:end],
        has_cls=probe.has_cls,
        num_prefix_tokens=probe.num_prefix_tokens,
        grid=probe.grid,
    )


def _as_size_list(image_sizes: Any, count_name: str) -> list[tuple[int, int]]:
    if isinstance(image_sizes, torch.Tensor):
        image_sizes = image_sizes.tolist()
    if not isinstance(image_sizes, Sequence) or not all(
        isinstance(size, Sequence) and len(size) == 2 for size in image_sizes
    ):
        raise ValueError(
            f"inputs['{count_name}'] must hold one (height, width) pair per image, as the processor returns it"
        )
    return [(int(height), int(width)) for height, width in image_sizes]


class LlavaNextAdapter(Adapter):
    families = ("LlavaNextForConditionalGeneration",)
    image_input_keys = ("pixel_values",)
    # The model's packing only lines up for this strategy (with "full", the [CLS] row breaks its grid view).
    feature_select_strategy = "default"
    takes_videos = False

    def __init__(self, model: nn.Module, config: VisionZipConfig, processor: Any = None) -> None:
        strategy = getattr(model.config, "vision_feature_select_strategy", None)
        if strategy != self.feature_select_strategy:
            raise ValueError(
                f"model: {type(model).__name__} with vision_feature_select_strategy={strategy!r} is not supported; "
                f"expected {self.feature_select_strategy!r}"
            )
        if config.temporal_threshold is not None and not self.takes_videos:
            raise ValueError(f"temporal_threshold applies to videos; {type(model).__name__} takes none (leave it None)")
        super().__init__(model, config, processor)

    # --- model parts ---------------------------------------------------------------------
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector

    @property
    def crop_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.crop_size // self.tower_info.patch_size
        return side, side

    def tokens_per_unit(self) -> int:
        rows, cols = self.patch_grid
        return self.tower_info.num_prefix_tokens + rows * cols

    # --- budget ----------------------------------------------------------------------------
    def crop_count_range(self) -> tuple[int, int]:
        """Fewest and most crops (base included) one image can have under the model's grid pinpoints."""
        grids = [(h // self.crop_size) * (w // self.crop_size) for h, w in self.model.config.image_grid_pinpoints]
        return 1 + min(grids), 1 + max(grids)

    def check_budget(self) -> None:
        available = self.tokens_per_unit()
        if self.config.budget_scope == "per_crop":
            if self.config.tokens > available:
                raise ValueError(
                    f"dominant + contextual must be <= {available} (the tokens this model's tower yields per crop) "
                    f"with budget_scope='per_crop', got {self.config.dominant} + {self.config.contextual} = "
                    f"{self.config.tokens}"
                )
            return
        fewest, most = self.crop_count_range()
        self.config.per_unit(most)  # raises when the crops outnumber the dominant tokens
        per_crop = self.config.per_unit(fewest)
        if per_crop.tokens > available:
            raise ValueError(
                f"with budget_scope='per_image', an image of {fewest} crops (the fewest on this model) would give "
                f"each crop {per_crop.dominant} + {per_crop.contextual} tokens, more than the {available} a crop has; "
                f"lower dominant + contextual (at most about {fewest * available}), got {self.config.tokens}"
            )

    # --- images ----------------------------------------------------------------------------
    def image_crop_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        """Crops (base included) the model encodes for each image, as its own get_image_features counts them."""
        sizes = _as_size_list(inputs.get("image_sizes"), "image_sizes")
        pinpoints = self.model.config.image_grid_pinpoints
        return [image_size_to_num_patches(list(size), pinpoints, self.crop_size) for size in sizes]

    def packed_length(self, crops: int, image_size: tuple[int, int]) -> int:
        """Placeholders for one image: the model's own packing run on a one-channel dummy."""
        rows, cols = self.patch_grid
        dummy = torch.zeros(crops, rows * cols, 1)
        _, lengths = self.model.model.pack_image_features(
            [dummy], [list(image_size)], self.feature_select_strategy, image_newline=torch.zeros(1)
        )
        return int(lengths[0])

    def image_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        sizes = _as_size_list(inputs.get("image_sizes"), "image_sizes")
        return [
            self.packed_length(crops, size) for crops, size in zip(self.image_crop_counts(inputs), sizes, strict=True)
        ]

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        return self.image_counts(inputs)

    def image_crops(self, inputs: Mapping[str, Any], crop_counts: Sequence[int]) -> torch.Tensor:
        """All images' real crops as one (crops, channels, height, width) batch (batch padding dropped)."""
        pixel_values = inputs["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim not in (4, 5):
            raise ValueError(
                "inputs['pixel_values'] must be a (images, crops, channels, height, width) tensor as the processor "
                f"returns it, got {getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
            )
        if pixel_values.ndim == 4:  # already the concatenated crops of every image
            if pixel_values.shape[0] != sum(crop_counts):
                raise ValueError(
                    f"inputs['pixel_values'] holds {pixel_values.shape[0]} crops but image_sizes needs "
                    f"{sum(crop_counts)} ({list(crop_counts)} per image)"
                )
            return pixel_values
        if pixel_values.shape[0] != len(crop_counts) or pixel_values.shape[1] < max(crop_counts):
            raise ValueError(
                f"inputs['pixel_values'] has shape {tuple(pixel_values.shape)} but image_sizes describes "
                f"{len(crop_counts)} images of up to {max(crop_counts)} crops"
            )
        return torch.cat([image[:count] for image, count in zip(pixel_values, crop_counts, strict=True)])

    def crop_grid(self, crops: int, image_size: tuple[int, int]) -> tuple[int, int]:
        if crops == 1:
            return 0, 0
        rows, cols = get_anyres_image_grid_shape(
            list(image_size), self.model.config.image_grid_pinpoints, self.crop_size
        )
        return int(rows), int(cols)

    def reduce_units(self, probe: ProbeOutput, units: int) -> Reduction:
        """Apply the method to the crops (or frames) of one image (or video) with its per-unit budget."""
        config = self.config.per_unit(units)
        num_tokens = probe.features.shape[1]
        if config.tokens > num_tokens:
            raise ValueError(
                f"dominant + contextual must be <= {num_tokens} per crop for these inputs, got {config.tokens}"
            )
        return self.method(probe, config)

    def encode_images(self, inputs: Mapping[str, Any]) -> EncodedImages:
        sizes = _as_size_list(inputs.get("image_sizes"), "image_sizes")
        crop_counts = self.image_crop_counts(inputs)
        full_counts = self.image_counts(inputs)
        probe = probe_vision_tower(self.vision_tower(), self.image_crops(inputs, crop_counts), self.feature_layer)
        features, reductions = [], []
        start = 0
        for image, (crops, size) in enumerate(zip(crop_counts, sizes, strict=True)):
            reduction = self.reduce_units(slice_probe(probe, start, start + crops), crops)
            start += crops
            projected = self.projector()(reduction.features)
            laid_out = anyres_layout(
                projected,
                reduction.kept_indices,
                self.crop_grid(crops, size),
                self.patch_grid,
                probe.num_prefix_tokens,
            )
            if laid_out.shape[0] > full_counts[image]:
                raise ValueError(
                    f"image {image}: the budget gives {laid_out.shape[0]} tokens ({crops} crops x "
                    f"{reduction.features.shape[1]}) but the image has only {full_counts[image]} placeholders; "
                    "lower dominant / contextual or use budget_scope='per_image'"
                )
            features.append(laid_out)
            reductions.append(reduction)
        return EncodedImages(features=features, full_counts=full_counts, reductions=reductions)

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        return self.encode_images(inputs)
