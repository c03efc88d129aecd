"""SmolVLM (`SmolVLMForConditionalGeneration`): SigLIP tiles, pixel shuffle, row/column text between tiles.

What differs from LLaVA:
- The processor splits an image into a grid of square tiles plus a global image (the whole image,
  resized to one tile), each written as `<fake_token_around_image><row_r_col_c>` + one placeholder run,
  the global one as `<fake_token_around_image><global-img>` + its run + `<fake_token_around_image>`.
  Small images are a global image only; video frames are global images with timestamps between them.
  The runs are separated by these layout tokens, which stay as text: only the runs shrink.
- The feature is the tower's last layer after its post-layernorm (the model has no
  `vision_feature_layer`); `VisionZipConfig(feature_layer=...)` picks another layer, still normed.
- SigLIP has no [CLS]: a patch's score is the attention it receives in the feature layer (averaged
  over queries, summed over heads).
- The connector pixel-shuffles `scale_factor x scale_factor` patches into one token before its linear
  projection. Selection happens on those shuffled units, the tokens the language model sees: a unit's
  score is the sum of its patches' scores, its key the mean of their keys (the feature layer's `k_proj`
  output averaged over heads). Membership comes from the connector's own `pixel_shuffle` applied to
  patch indices, so the grouping is exactly the one the features get. The method reduces the
  connector's outputs (the projection is per unit, so this equals shuffling the kept patches first).
- Budget: `dominant + contextual` per tile by default (the global image counts as a tile, like
  LLaVA-NeXT's base crop); `budget_scope="per_image"` splits the totals evenly over an image's tiles
  (`VisionZipConfig.per_unit`). Every tile's reduced tokens fill its own run: dominant tokens in raster
  order of the shuffled grid, then the contextual tokens.
- Original positions (`positions="original"`): every tile is a run of its own, whose placeholder i
  held shuffled unit i; a reduced token takes the position of its anchor unit (`core.anchor_indices`).
  The layout tokens between the runs keep their positions, as all text does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from vlmzip._validation import budget_error
from vlmzip.adapters.base import Adapter, EncodedImages, reduction_list
from vlmzip.core import Reduction
from vlmzip.probe import ProbeOutput, TowerInfo, TowerLayout, resolve_tower

SMOLVLM_TOWER = TowerLayout(
    layers=lambda tower: tower.encoder.layers,
    attention=lambda layer: layer.self_attn,
    has_cls=False,
    num_prefix_tokens=lambda config: 0,
)


def shuffle_units(connector: nn.Module, side: int) -> torch.Tensor:
    """(units, scale**2) patch indices of every shuffled unit, by the connector's own `pixel_shuffle`.

    Patch indices are raster indices over the `side x side` patch grid; units are in the order the
    connector emits them.
    """
    scale = int(connector.scale_factor)
    indices = torch.arange(side * side, dtype=torch.float64).view(1, side * side, 1)
    return connector.pixel_shuffle(indices, scale)[0].round().long()


def pool_units(probe: ProbeOutput, units: torch.Tensor, features: torch.Tensor, grid: tuple[int, int]) -> ProbeOutput:
    """The probe of the shuffled units: scores summed and keys averaged over each unit's patches."""
    units = units.to(probe.scores.device)
    return ProbeOutput(
        features=features,
        scores=probe.scores[:, units].sum(dim=-1),
        keys=probe.keys[:, units].mean(dim=-2),
        has_cls=False,
        num_prefix_tokens=0,
        grid=grid,
    )


class SmolVLMAdapter(Adapter):
    families = ("SmolVLMForConditionalGeneration",)
    image_input_keys = ("pixel_values", "pixel_attention_mask")
    supports_original_positions = True
    supports_adaptive = True

    # --- model parts ---------------------------------------------------------------------
    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_model

    def connector(self) -> nn.Module:
        return self.model.model.connector

    def resolve_tower_info(self) -> TowerInfo:
        return resolve_tower(self.vision_tower(), SMOLVLM_TOWER)

    def resolve_feature_layer(self, layer: int | None) -> int:
        layer = -1 if layer is None else layer
        self.tower_info.feature_layer_index(layer)  # raises when out of range
        return layer

    @property
    def scale(self) -> int:
        return int(self.model.config.scale_factor)

    def tile_side(self, pixels: int) -> int:
        """Patches per side of a square tile of `pixels` pixels; the shuffle needs a multiple of the scale."""
        side = pixels // self.tower_info.patch_size
        if side < 1 or side % self.scale:
            raise ValueError(
                f"inputs['pixel_values']: tiles of {pixels} px give {side} patches per side, which the pixel "
                f"shuffle (scale {self.scale}) cannot group; pass the processor's output"
            )
        return side

    def tokens_per_unit(self) -> int:
        side = int(self.model.config.vision_config.image_size) // self.tower_info.patch_size
        return (side // self.scale) ** 2

    def check_budget(self) -> None:
        # Both scopes: an image may be a single tile (its global image), which then gets the whole budget.
        available = self.tokens_per_unit()
        if self.config.fewest_tokens > available:
            raise budget_error(self.config, available, " (the shuffled tokens of one SmolVLM tile)")

    def pad_token_id(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        # SmolVLMConfig.pad_token_id is deprecated and may not be the language model's pad id.
        for source in (self.model.config.text_config, getattr(self.model, "generation_config", None)):
            value = getattr(source, "pad_token_id", None) if source is not None else None
            if isinstance(value, int):
                return value
        padded = input_ids[attention_mask == 0]
        return int(padded[0]) if padded.numel() else 0

    # --- tiles ---------------------------------------------------------------------------
    def real_tiles(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(tiles, C, H, W) of every real tile in placeholder order, as the model selects them, and their
        pixel masks. Batch padding (all-zero tiles) is dropped exactly as `get_image_features` drops it."""
        pixel_values = inputs["pixel_values"]
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 5 or not pixel_values.is_floating_point():
            raise ValueError(
                "inputs['pixel_values'] must be a (batch, tiles, channels, height, width) float tensor as the "
                f"SmolVLM processor returns it, got {getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
            )
        height, width = pixel_values.shape[-2:]
        if height != width:
            raise ValueError(f"inputs['pixel_values']: SmolVLM tiles are square, got {height}x{width}")
        flat = pixel_values.flatten(0, 1)
        real = (flat == 0.0).sum(dim=(-1, -2, -3)) != flat.shape[1:].numel()
        real[0] |= ~torch.any(real)
        masks = inputs.get("pixel_attention_mask")
        if masks is not None:
            expected = (*pixel_values.shape[:2], height, width)
            if not isinstance(masks, torch.Tensor) or tuple(masks.shape) != expected:
                raise ValueError(
                    f"inputs['pixel_attention_mask'] must be a {expected} tensor like pixel_values, got "
                    f"{getattr(masks, 'shape', type(masks).__name__)}"
                )
            masks = masks.flatten(0, 1)[real]
        return flat[real], masks

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        tiles, _ = self.real_tiles(inputs)
        side = self.tile_side(tiles.shape[-1])
        return [(side // self.scale) ** 2] * tiles.shape[0]

    def tile_groups(self, inputs: Mapping[str, Any], runs: int) -> list[int]:
        """Tiles per image, in text order: an image's tiles end with its global image.

        The global image's run is the one after the `<global-img>` token, which is also the token
        before the last run of every sample (every image ends with its global image). Video frames are
        global images, so each frame is an image of one tile.
        """
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        image_id = self.image_token_id
        groups: list[int] = []
        for sample in range(input_ids.shape[0]):
            ids = input_ids[sample][attention_mask[sample].bool()].tolist()
            starts = [i for i, token in enumerate(ids) if token == image_id and (i == 0 or ids[i - 1] != image_id)]
            if not starts:
                continue
            if starts[0] == 0:
                raise ValueError("inputs: a SmolVLM placeholder run must follow its layout token")
            global_token = ids[starts[-1] - 1]
            count = 0
            for start in starts:
                count += 1
                if ids[start - 1] == global_token:
                    groups.append(count)
                    count = 0
            if count:
                raise ValueError(
                    f"inputs: sample {sample} has tiles after its last global image; pass the processor's output"
                )
        if sum(groups) != runs:
            raise ValueError(f"inputs: the text holds {sum(groups)} tile runs but pixel_values holds {runs} tiles")
        return groups

    # --- encoding ------------------------------------------------------------------------
    def probe_tiles(self, tiles: torch.Tensor, masks: torch.Tensor | None) -> ProbeOutput:
        """The shuffled units of every tile: projected features, pooled scores and keys."""
        tower = self.vision_tower()
        patch = self.tower_info.patch_size
        side = self.tile_side(tiles.shape[-1])
        if masks is not None:
            cells = masks.unfold(1, patch, patch).unfold(2, patch, patch).sum(dim=(-1, -2)) > 0
            if not bool(cells.all()):
                raise ValueError(
                    "inputs['pixel_attention_mask']: tiles with padded patches are not supported; SmolVLM's "
                    "processor makes every tile full (image splitting resizes to whole tiles)"
                )
        probe = self.probe_tower(tiles.to(tower.dtype), layout=SMOLVLM_TOWER)
        projected = self.connector()(tower.post_layernorm(probe.features))
        grid = (side // self.scale, side // self.scale)
        return pool_units(probe, shuffle_units(self.connector(), side), projected, grid)

    def reduce_tiles(self, probe: ProbeOutput, tiles: int) -> Reduction | list[Reduction]:
        """The tiles of `probe` reduced with the budget of an image of `tiles` tiles (one reduction per tile
        with an adaptive budget, see `Adapter.run_method`)."""
        config = self.config.per_unit(tiles)
        units = probe.features.shape[1]
        if config.fewest_tokens > units:
            rows, cols = probe.grid
            raise budget_error(config, units, f" per tile (the {rows}x{cols} shuffled tokens of a SmolVLM tile)")
        return self.run_method(probe, config)

    @property
    def token_pixels(self) -> int:
        return self.tower_info.patch_size * self.scale

    def unit_labels(self, count: int) -> list[str] | None:
        # The processor puts the grid tiles first (row-major) and the global image last.
        return [f"tile {index}" for index in range(1, count)] + ["global image"] if count > 1 else None

    def reduce(
        self, pixel_values: torch.Tensor, **tower_kwargs: Any
    ) -> tuple[ProbeOutput, Reduction | list[Reduction]]:
        """Reduce the tiles of one image (`pixel_values` (tiles, C, H, W)), as `encode` reduces them."""
        probe = self.probe_tiles(pixel_values, None)
        return probe, self.reduce_tiles(probe, pixel_values.shape[0] if self.config.budget_scope == "per_image" else 1)

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        tiles, masks = self.real_tiles(inputs)
        full_counts = self.full_counts(inputs)
        probe = self.probe_tiles(tiles, masks)
        if self.config.budget_scope == "per_crop":
            reductions = reduction_list(self.reduce_tiles(probe, 1))  # adaptive: one per tile
        else:  # (adaptive budgets need "per_crop")
            reductions, start = [], 0
            for count in self.tile_groups(inputs, tiles.shape[0]):
                reductions.append(self.reduce_tiles(probe[start : start + count], count))
                start += count
        features = [tile for reduction in reductions for tile in reduction.features.unbind(0)]
        positions = self.anchor_rows(reductions)  # every tile is a run of its own
        return EncodedImages(features=features, full_counts=full_counts, reductions=reductions, positions=positions)


__all__ = ["SMOLVLM_TOWER", "SmolVLMAdapter", "pool_units", "shuffle_units"]
