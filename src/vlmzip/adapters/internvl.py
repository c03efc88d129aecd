"""InternVL (`InternVLForConditionalGeneration`): InternViT with [CLS], pixel shuffle, dynamic tiles.

The processor (`GotOcr2ImageProcessorPil` with `crop_to_patches=True`) cuts an image into 1 to
`max_patches` square tiles plus, when there is more than one tile, a thumbnail of the whole image
(last). Each tile runs through InternViT (448 px / patch 14: [CLS] + 32 x 32 patches); the model drops
[CLS], pixel-shuffles the patch grid (`downsample_ratio` 0.5: every 2 x 2 block of patches becomes one
unit of 4x the width, 16 x 16 = 256 units) and projects the units. The text holds
`<img>` + 256 `<IMG_CONTEXT>` per tile + `</img>` for each image.

VisionZip selects among the units the language model sees:

- features: the feature layer's patch tokens (`vision_feature_layer`, -1 by default, with the tower's
  final layernorm where it has one, as the model takes them), pixel-shuffled by the model's own
  `pixel_shuffle`;
- scores: the [CLS] row of the feature layer's softmax attention, summed over heads; a unit scores the
  sum over its patches (the [CLS] attention the unit received). [CLS] itself is dropped by the
  shuffle, so there is no [CLS] slot: all `dominant` tokens are units;
- keys: the feature layer's keys (after q/k normalisation where the tower has it, i.e. the keys the
  attention uses) averaged over heads, then over the unit's patches.

The method runs on the shuffled features, before the projector (as the paper merges vision features
before its projector); the projector then maps the reduced units. Which patches form a unit is read
from the model's `pixel_shuffle` itself (run on patch indices), so scores, keys and features line up.

Budget: `budget_scope="per_crop"` (default) gives every tile, thumbnail included, `dominant +
contextual` tokens; `"per_image"` splits the numbers over an image's tiles (`VisionZipConfig.per_unit`).
Layout of an image: its tiles in the processor's order (thumbnail last), each tile's dominant units in
raster order, then its contextual tokens. `<img>` and `</img>` stay in the text. Video frames are
separate `<img>...</img>` runs of one tile each and are reduced like one-tile images.

Original positions (`positions="original"`): unit i of tile t held placeholder `t * 256 + i` of its
image's run, so a reduced token takes the position of its anchor unit (`core.anchor_indices`) in its tile.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmzip._validation import budget_error
from vlmzip.adapters.base import Adapter, EncodedImages, check_square_batch, reduction_list
from vlmzip.adapters.parts import TowerAndProjector
from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction
from vlmzip.probe import ProbeOutput, square_size


def image_runs(input_ids: torch.Tensor, attention_mask: torch.Tensor, token_id: int) -> list[int]:
    """Lengths of the runs of `token_id` among the attended tokens, sample by sample, in text order."""
    runs: list[int] = []
    for sample in range(input_ids.shape[0]):
        ids = input_ids[sample][attention_mask[sample].bool()].tolist()
        length = 0
        for token in [*ids, None]:
            if token == token_id:
                length += 1
            elif length:
                runs.append(length)
                length = 0
    return runs


class InternVLAdapter(TowerAndProjector, Adapter):
    families = ("InternVLForConditionalGeneration",)
    image_input_keys = ("pixel_values",)
    supports_original_positions = True
    supports_adaptive = True

    def __init__(self, model: nn.Module, config: VisionZipConfig, processor: Any = None) -> None:
        if config.temporal_threshold is not None:
            raise ValueError(
                f"temporal_threshold applies to videos; {type(model).__name__} reduces video frames as separate "
                "images (leave it None)"
            )
        super().__init__(model, config, processor)

    def check_model(self) -> None:
        strategy = getattr(self.model.config, "vision_feature_select_strategy", None)
        if strategy != "default":
            raise ValueError(
                f"model: {type(self.model).__name__} with vision_feature_select_strategy={strategy!r} is not "
                "supported; expected 'default' (the model's pixel shuffle needs [CLS] dropped)"
            )
        ratio = float(self.model.config.downsample_ratio)
        factor = round(1 / ratio)
        if factor < 1 or factor * ratio != 1:
            raise ValueError(f"model: downsample_ratio must be 1 / an integer, got {ratio}")
        self.shuffle_factor = factor

    # --- model parts (vision_tower, projector: TowerAndProjector) ---------------------------
    @property
    def patch_side(self) -> int:
        image_size = square_size(self.model.config.vision_config.image_size, "image_size")
        return image_size // self.tower_info.patch_size

    @property
    def unit_side(self) -> int:
        return self.patch_side // self.shuffle_factor

    def tokens_per_unit(self) -> int:
        """Units (placeholders) per tile."""
        return self.unit_side**2

    def check_budget(self) -> None:
        available = self.tokens_per_unit()
        if self.config.budget_scope == "per_crop" and self.config.fewest_tokens > available:
            side = self.unit_side
            raise budget_error(
                self.config,
                available,
                f" (the tokens this model gives each tile: {side} x {side} after the pixel shuffle) with "
                "budget_scope='per_crop'",
            )

    # --- tiles ---------------------------------------------------------------------------
    def tile_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        """Tiles (thumbnail included) of every image, in text order, read from its placeholder run."""
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        per_tile = self.tokens_per_unit()
        runs = image_runs(input_ids, attention_mask, self.image_token_id)
        if any(run % per_tile for run in runs):
            raise ValueError(
                f"inputs: every image placeholder run must hold a multiple of {per_tile} tokens (one tile each), "
                f"got runs of {runs}; pass the processor's unmodified output"
            )
        tiles = [run // per_tile for run in runs]
        pixel_values = inputs["pixel_values"]
        side = self.patch_side * self.tower_info.patch_size
        check_square_batch(pixel_values, side, "tiles")
        if sum(tiles) != pixel_values.shape[0]:
            raise ValueError(
                f"inputs: the text holds placeholders for {sum(tiles)} tiles ({tiles} per image) but pixel_values "
                f"has {pixel_values.shape[0]}; pass the processor's unmodified output for the same images and text"
            )
        return tiles

    def budget_unit_tokens(self, inputs: Mapping[str, Any]) -> int:
        return self.tokens_per_unit()

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        return [tiles * self.tokens_per_unit() for tiles in self.tile_counts(inputs)]

    # --- encoding ------------------------------------------------------------------------
    def unit_members(self, device: torch.device) -> torch.Tensor:
        """(units, factor**2) patch indices of every unit, read from the model's own pixel shuffle."""
        side = self.patch_side
        index = torch.arange(side * side, dtype=torch.float64, device=device).view(1, side, side, 1)
        shuffled = self.model.model.pixel_shuffle(index, scale_factor=1 / self.shuffle_factor)
        return shuffled.reshape(-1, self.shuffle_factor**2).round().long()

    def shuffled_probe(self, pixel_values: torch.Tensor) -> ProbeOutput:
        """The feature layer of every tile as pixel-shuffled units: features, [CLS]-attention scores, keys."""
        tower = self.vision_tower()
        probe = self.probe_tower(pixel_values.to(tower.dtype))
        features = probe.features
        if self.feature_layer == -1:  # the model then takes last_hidden_state: the final layernorm applied
            features = tower.layernorm(features)  # (an identity on towers with mean pooling)
        patches = features[:, probe.num_prefix_tokens :]
        batch, _, channels = patches.shape
        side = self.patch_side
        shuffled = self.model.model.pixel_shuffle(
            patches.reshape(batch, side, side, channels), scale_factor=1 / self.shuffle_factor
        )
        members = self.unit_members(features.device)
        patch_keys = probe.keys[:, probe.num_prefix_tokens :]
        return ProbeOutput(
            features=shuffled.reshape(batch, -1, shuffled.shape[-1]),
            scores=probe.scores[:, members].sum(dim=-1),  # probe.scores already leave out [CLS]'s own column
            keys=patch_keys[:, members].mean(dim=-2),
            has_cls=False,
            num_prefix_tokens=0,
            grid=(self.unit_side, self.unit_side),
        )

    def tile_config(self, tiles: int, image: int) -> VisionZipConfig:
        """The budget each tile of image `image` gets; raises when the image cannot take the budget."""
        config = self.config.per_unit(tiles)
        available = self.tokens_per_unit()
        if config.fewest_tokens > available:  # (an adaptive budget's `dominant` is unused)
            raise ValueError(
                f"with budget_scope='per_image', image {image} of {tiles} tile(s) would give each tile "
                f"{config.dominant} + {config.contextual} tokens, more than the {available} a tile has; lower "
                f"dominant + contextual to at most {tiles * available} for this image, got {self.config.tokens}"
            )
        return config

    def reduce(
        self, pixel_values: torch.Tensor, **tower_kwargs: Any
    ) -> tuple[ProbeOutput, Reduction | list[Reduction]]:
        """The shuffled probe of the tiles of one image and the method's reduction of it (each tile alike; one
        reduction per tile with an adaptive budget, see `Adapter.run_method`)."""
        probe = self.shuffled_probe(pixel_values)
        return probe, self.run_method(probe, self.tile_config(pixel_values.shape[0], 0))

    @property
    def token_pixels(self) -> int:
        return self.tower_info.patch_size * self.shuffle_factor  # a shuffled unit's pixels

    def unit_labels(self, count: int) -> list[str] | None:
        # The processor puts the thumbnail (the whole image) after the tiles.
        return [f"tile {index}" for index in range(1, count)] + ["thumbnail"] if count > 1 else None

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        tiles = self.tile_counts(inputs)
        configs = [self.tile_config(count, image) for image, count in enumerate(tiles)]  # before the tower runs
        probe = self.shuffled_probe(inputs["pixel_values"])
        per_tile = self.tokens_per_unit()
        features, reductions, positions = [], [], []
        start = 0
        for count, config in zip(tiles, configs, strict=True):
            image = reduction_list(self.run_method(probe[start : start + count], config))  # adaptive: one per tile
            start += count
            features.append(torch.cat([self.projector()(reduction.features).flatten(0, 1) for reduction in image]))
            reductions.extend(image)
            anchors = self.anchor_rows(image)
            if anchors is not None:  # a tile's placeholders follow the previous tiles' `per_tile` each
                positions.append(torch.cat([tile * per_tile + row for tile, row in enumerate(anchors)]))
        full_counts = [count * per_tile for count in tiles]
        original = self.config.positions == "original"
        return EncodedImages(features, full_counts, reductions=reductions, positions=positions if original else None)

    def attach_features(self, prepared: dict[str, Any], encoded: EncodedImages) -> None:
        # InternVL takes one tensor; images have different token counts (their tiles), so every token is
        # handed over as an item of its own, (tokens, 1, hidden): generate() then regroups them per sample
        # (beam search) by counting placeholders, and the model scatters them in order.
        tokens = torch.cat(encoded.features).unsqueeze(1)
        prepared["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=tokens)}


__all__ = ["InternVLAdapter", "image_runs"]
