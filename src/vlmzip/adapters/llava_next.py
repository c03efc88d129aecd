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

from vlmzip._validation import budget_error
from vlmzip.adapters.base import CROP_COUNTS_KEY, Adapter, EncodedImages
from vlmzip.adapters.parts import TowerAndProjector
from vlmzip.cache import VisualUnit
from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction, anchor_indices
from vlmzip.probe import ProbeOutput


def anyres_layout(
    features: torch.Tensor | Sequence[torch.Tensor],
    kept_indices: torch.Tensor | Sequence[torch.Tensor],
    crop_grid: tuple[int, int],
    patch_grid: tuple[int, int],
    num_prefix_tokens: int,
) -> torch.Tensor:
    """One image's reduced crops in the reference AnyRes order, as (tokens, ...).

    features: per crop (a (crops, tokens, ...) tensor or a list of (tokens_k, ...) tensors), the base
        crop first, then the grid crops row-major over `crop_grid` (rows, cols); each crop holds its
        dominant tokens first (as many as its `kept_indices` row has), then its contextual tokens.
        Crops may differ in length (adaptive budgets); any dtype works (the order is pure indexing).
    kept_indices: per crop, the ascending token indices of its dominant tokens ((crops, dominant) or a list).
    patch_grid: (rows, cols) of patches in one crop; patches follow `num_prefix_tokens` tokens.
    """
    features, kept_indices = list(features), list(kept_indices)
    if len(features) == 1:
        return features[0]
    crop_rows, crop_cols = crop_grid
    patch_rows, patch_cols = patch_grid
    if len(features) - 1 != crop_rows * crop_cols:
        raise ValueError(f"got {len(features) - 1} grid crops for a {crop_rows}x{crop_cols} crop grid")
    patch_tokens, stitched, prefix_tokens, contextual = [], [], [], []
    for crop, (tokens, kept) in enumerate(zip(features[1:], kept_indices[1:], strict=True)):
        dominant = tokens[: kept.shape[0]]
        is_prefix = kept < num_prefix_tokens
        # Position of every dominant patch in the stitched (crop_rows * patch_rows) x (crop_cols * patch_cols) grid.
        patch = kept[~is_prefix] - num_prefix_tokens
        row = (crop // crop_cols) * patch_rows + patch // patch_cols
        col = (crop % crop_cols) * patch_cols + patch % patch_cols
        stitched.append(row * (crop_cols * patch_cols) + col)
        patch_tokens.append(dominant[~is_prefix])
        prefix_tokens.append(dominant[is_prefix])
        contextual.append(tokens[kept.shape[0] :])
    order = torch.cat(stitched).argsort(stable=True)
    return torch.cat([features[0], torch.cat(patch_tokens)[order], *prefix_tokens, *contextual])


def stitched_coordinates(
    crop: torch.Tensor, index: torch.Tensor, crop_grid: tuple[int, int], patch_grid: tuple[int, int], prefix: int
) -> torch.Tensor:
    """(n, 2) float (row, col) in the stitched grid of all grid crops of tower token `index` of grid crop `crop`
    (0-based among the grid crops); a prefix token ([CLS]) takes its crop's first patch."""
    patch_rows, patch_cols = patch_grid
    _, crop_cols = crop_grid
    patch = (index - prefix).clamp(min=0)
    row = (crop // crop_cols) * patch_rows + patch // patch_cols
    col = (crop % crop_cols) * patch_cols + patch % patch_cols
    return torch.stack([row, col], dim=1).float()


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


def capped_adaptive(config: VisionZipConfig, crops: int, placeholders: int) -> VisionZipConfig:
    """An adaptive `config` for one AnyRes image of `crops` crops and `placeholders` unreduced placeholders.

    Unpadding (and OneVision's downscaling) leaves an image fewer placeholders than crops x tokens per crop,
    so crops that all keep most of their tokens would send more tokens than the image has without VisionZip.
    Each crop then keeps at most `placeholders // crops - contextual` dominant tokens (a tighter
    `max_dominant`); an image too small for even `min_dominant` is refused, naming it.
    """
    share = placeholders // crops
    ceiling = share - config.contextual
    if ceiling < config.min_dominant:
        raise ValueError(
            f"min_dominant + contextual must be <= {share} for an image of {crops} crops and {placeholders} "
            f"placeholders, got {config.min_dominant} + {config.contextual} = {config.fewest_tokens}"
        )
    if config.max_dominant is not None and config.max_dominant <= ceiling:
        return config
    return config.replace(max_dominant=ceiling)


class LlavaNextAdapter(TowerAndProjector, Adapter):
    families = ("LlavaNextForConditionalGeneration",)
    image_input_keys = ("pixel_values",)
    # The model's packing only lines up for this strategy (with "full", the [CLS] row breaks its grid view).
    feature_select_strategy = "default"
    takes_videos = False
    supports_original_positions = True
    supports_adaptive = True

    def __init__(self, model: nn.Module, config: VisionZipConfig, processor: Any = None) -> None:
        if config.temporal_threshold is not None and not self.takes_videos:
            raise ValueError(f"temporal_threshold applies to videos; {type(model).__name__} takes none (leave it None)")
        super().__init__(model, config, processor)

    def check_model(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", None)
        if strategy != self.feature_select_strategy:
            raise ValueError(
                f"model: {type(self.model).__name__} with vision_feature_select_strategy={strategy!r} is not "
                f"supported; expected {self.feature_select_strategy!r}"
            )

    # --- model parts (vision_tower, projector: TowerAndProjector) ---------------------------
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
        self.check_adaptive(available)
        if self.config.budget_scope == "per_crop":
            if self.config.fewest_tokens > available:
                where = " (the tokens this model's tower yields per crop) with budget_scope='per_crop'"
                raise budget_error(self.config, available, where)
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
        if inputs.get(CROP_COUNTS_KEY) is not None:  # items regrouped by units_inputs()
            return list(inputs[CROP_COUNTS_KEY])
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

    def reduce_units(
        self, probe: ProbeOutput, units: int, placeholders: int | None = None
    ) -> Reduction | list[Reduction]:
        """Apply the method to the crops (or frames) of one image (or video) with its per-unit budget.

        placeholders: the image's unreduced placeholder count; an adaptive budget never gives the image
        more tokens than that (see `capped_adaptive`).
        """
        config = self.config.per_unit(units)
        num_tokens = probe.features.shape[1]
        if config.fewest_tokens > num_tokens:
            raise ValueError(
                f"dominant + contextual must be <= {num_tokens} per crop for these inputs, got {config.fewest_tokens}"
            )
        if config.adaptive and placeholders is not None:
            config = capped_adaptive(config, units, placeholders)
        return self.run_method(probe, config)

    # --- original positions ------------------------------------------------------------------
    def packed_coordinates(self, crops: int, image_size: tuple[int, int]) -> torch.Tensor:
        """(placeholders, 2): for each placeholder of the image, the stitched-grid (row, col) + 1 of the grid
        feature it holds, as the model's own packing (unpadding, any downscaling) places it; 0 for the base
        crop's placeholders and newlines."""
        rows, cols = self.patch_grid
        crop_grid = self.crop_grid(crops, image_size)
        dummy = torch.zeros(crops, rows * cols, 2)
        if crops > 1:
            index = torch.arange(rows * cols)  # the dummy holds patches only (the model's features drop [CLS])
            for crop in range(crops - 1):
                crop_index = torch.full_like(index, crop)
                dummy[crop + 1] = stitched_coordinates(crop_index, index, crop_grid, self.patch_grid, 0) + 1
        return self.pack_dummy(dummy, image_size)

    def pack_dummy(self, dummy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        packed, _ = self.model.model.pack_image_features(
            [dummy], [list(image_size)], self.feature_select_strategy, image_newline=torch.zeros(dummy.shape[-1])
        )
        return packed[0] if isinstance(packed, (list, tuple)) else packed  # one image: its packed features

    def original_placeholders(self, tags: torch.Tensor, crops: int, image_size: tuple[int, int]) -> torch.Tensor:
        """Placeholder offsets (within the image's run) whose positions the reduced tokens take.

        tags: (tokens, 2) [crop, tower token index of the anchor] in the order the tokens reach the model.
        The base crop fills the first placeholders (a [CLS] anchor takes its crop's first patch). A grid
        crop's token takes the placeholder that holds its stitched-grid cell in the model's packing, or the
        nearest cell there when unpadding (or OneVision's downscaling) removed its own, or the image's last
        placeholder when no grid cell is left at all.
        """
        crop, index = tags[:, 0], tags[:, 1]
        prefix = self.tower_info.num_prefix_tokens
        out = (index - prefix).clamp(min=0)
        grid = crop > 0
        if grid.any():
            packed = self.packed_coordinates(crops, image_size)
            rows, cols = self.patch_grid
            candidates = (packed.abs().sum(dim=1) > 0).nonzero().squeeze(1)
            candidates = candidates[candidates >= rows * cols]
            if candidates.numel() == 0:  # unpadding removed every grid cell (images of about 1:100 and narrower)
                out[grid] = packed.shape[0] - 1  # the image's last placeholder, just before the text
                return out
            crop_grid = self.crop_grid(crops, image_size)
            wanted = stitched_coordinates(crop[grid] - 1, index[grid], crop_grid, self.patch_grid, prefix) + 1
            out[grid] = candidates[torch.cdist(wanted, packed[candidates].float()).argmin(dim=1)]
        return out

    def encode_images(self, inputs: Mapping[str, Any]) -> EncodedImages:
        sizes = _as_size_list(inputs.get("image_sizes"), "image_sizes")
        crop_counts = self.image_crop_counts(inputs)
        full_counts = self.image_counts(inputs)
        probe = self.probe_tower(self.image_crops(inputs, crop_counts))
        features, reductions, positions = [], [], []
        start = 0
        for image, (crops, size) in enumerate(zip(crop_counts, sizes, strict=True)):
            reduced = self.reduce_units(probe[start : start + crops], crops, full_counts[image])
            start += crops
            if isinstance(reduced, Reduction):
                units = reduced.split()
                projected, kept = self.projector()(reduced.features), reduced.kept_indices
                reductions.append(reduced)
            else:  # adaptive budget: crops of different lengths
                units = reduced
                projected = [self.projector()(unit.features)[0] for unit in units]
                kept = [unit.kept_indices[0] for unit in units]
                reductions.extend(units)
            layout = (self.crop_grid(crops, size), self.patch_grid, probe.num_prefix_tokens)
            laid_out = anyres_layout(projected, kept, *layout)
            if laid_out.shape[0] > full_counts[image]:
                raise ValueError(
                    f"image {image}: the budget gives {laid_out.shape[0]} tokens ({crops} crops) but the image "
                    f"has only {full_counts[image]} placeholders; lower dominant / contextual or use "
                    "budget_scope='per_image'"
                )
            features.append(laid_out)
            if self.config.positions == "original":
                tags = [
                    torch.stack([torch.full_like(anchors, crop), anchors], dim=1)
                    for crop, anchors in enumerate(anchor_indices(unit)[0] for unit in units)
                ]
                positions.append(self.original_placeholders(anyres_layout(tags, kept, *layout), crops, size))
        return EncodedImages(
            features=features,
            full_counts=full_counts,
            reductions=reductions,
            positions=positions if self.config.positions == "original" else None,
        )

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        return self.encode_images(inputs)

    # --- the image cache -----------------------------------------------------------------------
    def image_units(self, inputs: Mapping[str, Any]) -> list[VisualUnit]:
        """One unit per image: its real crops, its size and crop count."""
        sizes = _as_size_list(inputs.get("image_sizes"), "image_sizes")
        crop_counts = self.image_crop_counts(inputs)
        counts = self.image_counts(inputs)
        crops = self.image_crops(inputs, crop_counts)
        units, start = [], 0
        for size, crop_count, count in zip(sizes, crop_counts, counts, strict=True):
            pixels = crops[start : start + crop_count]
            units.append(VisualUnit("image", (pixels,), (*size, crop_count), count, self.image_token_id))
            start += crop_count
        return units

    def visual_units(self, inputs: Mapping[str, Any]) -> list[VisualUnit]:
        return self.image_units(inputs)

    def units_inputs(self, units: Sequence[VisualUnit]) -> dict[str, Any]:
        images = [unit for unit in units if unit.modality == "image"]
        if not images:
            return {}
        return {
            "pixel_values": torch.cat([unit.tensors[0] for unit in images]),
            "image_sizes": torch.tensor([unit.layout[:2] for unit in images]),
            CROP_COUNTS_KEY: [unit.layout[2] for unit in images],
        }
