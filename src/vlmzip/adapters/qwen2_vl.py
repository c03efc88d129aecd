"""Qwen2-VL and Qwen2.5-VL (`Qwen2VLForConditionalGeneration`, `Qwen2_5_VLForConditionalGeneration`).

What differs from LLaVA:
- The tower takes flattened patches plus `grid_thw` (no batch dimension) and attends block-diagonally:
  one attention segment per image, and per temporal slice of a video (two frames that Qwen's patch
  embedding groups into one). Each segment is reduced on its own with the configured budget, so a
  video of `t` temporal slices sends `t * (dominant + contextual)` tokens.
- There is no [CLS]: a token's score is the attention it receives (averaged over the segment's
  queries, summed over heads) in the last block (Qwen2-VL) or the last full-attention block
  (Qwen2.5-VL, whose window attention permutes tokens; the permutation is undone per merge unit).
- The language model sees 2x2-merged tokens (the merger output). Selection happens on those merge
  units: a unit's score is the sum of its patches' scores, its key the mean of their keys (the
  block's fused `qkv` key part, bias included, before rotary embedding, averaged over heads). The
  merger runs on every unit and the method reduces its outputs: the merger is per unit, so this is
  the same as merging the kept patches first, and it keeps the model's own forward untouched.
- M-RoPE: every surviving token keeps the 3-D rope position it has in the unreduced prompt
  (`get_rope_index` on the original input); see `vlmzip.adapters.mrope`, shared with Qwen3-VL and Qwen3.5.

`Qwen2VLAdapter` is also the base of the Qwen3-VL and Qwen3.5 adapters, which change two things
through class attributes: `deepstack` (intermediate-layer features reduced with the main ones) and
`video_slice_runs` (each temporal slice of a video is its own placeholder run in the text).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from itertools import pairwise
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

from vlmzip._validation import budget_error
from vlmzip.adapters.base import _APPLIED, Adapter, EncodedImages, PaddingSide, placeholder_order
from vlmzip.adapters.cached import units_input_ids
from vlmzip.adapters.mrope import (
    MODALITY_INPUTS,
    UNREDUCED_LAYOUT_KEYS,
    mrope_positions,
    prepare_with_positions,
    reduced_slots,
    sequence_inputs,
)
from vlmzip.cache import CachedVisual, VisualUnit
from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction
from vlmzip.images import processor_max_units
from vlmzip.probe import (
    DEFAULT_QUERY_CHUNK,
    ProbeOutput,
    TowerInfo,
    TowerLayout,
    check_finite,
    received_attention,
    resolve_tower,
)
from vlmzip.video import temporal_keep_mask


# --- the tower probe ------------------------------------------------------------------------------
def _last_block(tower: nn.Module) -> int:
    return len(tower.blocks) - 1


def _last_full_attention_block(tower: nn.Module) -> int:
    full = [int(i) for i in tower.fullatt_block_indexes if 0 <= int(i) < len(tower.blocks)]
    if not full:
        raise ValueError(
            f"vision_model: {type(tower).__name__} has no full-attention block (fullatt_block_indexes="
            f"{list(tower.fullatt_block_indexes)}); VisionZip needs one to score whole images"
        )
    return max(full)


def _window_order(tower: nn.Module, grid_thw: torch.Tensor) -> torch.Tensor:
    """Qwen2.5-VL's `window_index`: merge unit i of the permuted sequence is unit window_index[i]."""
    window_index, _ = get_vision_window_index(
        grid_thw,
        spatial_merge_size=tower.spatial_merge_size,
        window_size=tower.window_size,
        patch_size=tower.patch_size,
    )
    return window_index


@dataclass(frozen=True)
class QwenTowerLayout:
    """How a Qwen tower is probed: which block scores the tokens and how its token order is permuted."""

    score_block: Callable[[nn.Module], int]
    unit_order: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None


# Keyed by class name so that the table needs no imports of model code.
QWEN_TOWER_LAYOUTS: dict[str, QwenTowerLayout] = {
    "Qwen2VisionTransformerPretrainedModel": QwenTowerLayout(score_block=_last_block),
    "Qwen2_5_VisionTransformerPretrainedModel": QwenTowerLayout(
        score_block=_last_full_attention_block, unit_order=_window_order
    ),
    # Qwen3-VL and Qwen3.5 towers attend fully in every block (no windows): the last block scores.
    "Qwen3VLVisionModel": QwenTowerLayout(score_block=_last_block),
    "Qwen3VLMoeVisionModel": QwenTowerLayout(score_block=_last_block),
    "Qwen3_5VisionModel": QwenTowerLayout(score_block=_last_block),
    "Qwen3_5MoeVisionModel": QwenTowerLayout(score_block=_last_block),
}


def _qwen_layout(vision_model: object) -> QwenTowerLayout:
    if not isinstance(vision_model, nn.Module):
        raise TypeError(f"vision_model must be a Qwen vision tower (nn.Module), got {type(vision_model).__name__}")
    layout = QWEN_TOWER_LAYOUTS.get(type(vision_model).__name__)
    if layout is None:
        raise ValueError(
            f"vision_model: unsupported Qwen vision tower {type(vision_model).__name__}; "
            f"supported: {sorted(QWEN_TOWER_LAYOUTS)}"
        )
    return layout


def check_grid_thw(name: str, grid_thw: object, merge_size: int) -> torch.Tensor:
    """`grid_thw` as an (items, 3) integer tensor whose height and width are multiples of `merge_size`."""
    if not isinstance(grid_thw, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (items, 3), got {type(grid_thw).__name__}")
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0 or grid_thw.is_floating_point():
        raise ValueError(
            f"{name} must be a non-empty (items, 3) integer tensor of (t, h, w) rows, got "
            f"{tuple(grid_thw.shape)} {grid_thw.dtype}"
        )
    if bool((grid_thw <= 0).any()) or bool((grid_thw[:, 1:] % merge_size != 0).any()):
        raise ValueError(
            f"{name} must hold positive (t, h, w) with h and w multiples of the merge size {merge_size}, "
            f"got {grid_thw.tolist()}"
        )
    return grid_thw


def _check_patches(name: str, pixel_values: object, grid_thw: torch.Tensor) -> torch.Tensor:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(pixel_values).__name__}")
    expected = int(grid_thw.prod(dim=1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape[0] != expected or not pixel_values.is_floating_point():
        raise ValueError(
            f"{name} must be the processor's flattened (patches, features) float tensor with {expected} rows "
            f"for grid {grid_thw.tolist()}, got {tuple(pixel_values.shape)} {pixel_values.dtype}"
        )
    return check_finite(name, pixel_values)


def probe_qwen_tower(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    *,
    query_chunk: int | None = DEFAULT_QUERY_CHUNK,
    deepstack: bool = False,
) -> list[ProbeOutput]:
    """Run a Qwen-VL tower (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5) and return one `ProbeOutput` per segment.

    A segment is an image, or one temporal slice of a video, in `grid_thw` order. Its tokens are
    the merge units the language model sees: `features` (1, units, out_hidden) are the merger's
    output, `scores` (1, units) the attention the unit's patches receive in the scoring block
    (averaged over queries, summed over heads and over the unit's patches), `keys` (1, units, head_dim)
    the block's keys averaged over heads and over the unit's patches, `grid` the merged (rows, cols).
    Only the scoring block's `qkv` output and arguments are captured; the tower runs on its own backend.
    With `deepstack=True` (Qwen3-VL), `features` are the merger output followed, along the channels,
    by every deepstack merger's output (in `deepstack_visual_indexes` order): (1, units, out_hidden * (1 + layers)).
    Reducing them together applies one selection and one set of merge groups to all of them, since
    every method selects on scores and keys and merges channel by channel.
    """
    layout = _qwen_layout(vision_model)
    merge = int(vision_model.spatial_merge_size)
    grid_thw = check_grid_thw("grid_thw", grid_thw, merge)
    pixel_values = _check_patches("pixel_values", pixel_values, grid_thw)
    attention = vision_model.blocks[layout.score_block(vision_model)].attn
    num_heads = int(attention.num_heads)

    captured: dict[str, Any] = {}

    def keep_arguments(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        captured["cu_seqlens"] = kwargs["cu_seqlens"]
        captured["position_embeddings"] = kwargs["position_embeddings"]

    def keep_qkv(module: nn.Module, args: Any, output: torch.Tensor) -> None:
        captured["qkv"] = output

    handles = [
        attention.register_forward_pre_hook(keep_arguments, with_kwargs=True),
        attention.qkv.register_forward_hook(keep_qkv),
    ]
    try:
        output = vision_model(pixel_values, grid_thw=grid_thw)
    finally:
        for handle in handles:
            handle.remove()

    merged = output.pooler_output
    if deepstack:
        layers = getattr(output, "deepstack_features", None)
        if not layers:
            raise ValueError(f"vision_model: {type(vision_model).__name__} returns no deepstack features")
        merged = torch.cat([merged, *layers], dim=-1)
    qkv = captured["qkv"]
    num_patches = qkv.shape[0]
    query, key = qkv.view(num_patches, 3, num_heads, -1).unbind(1)[:2]
    # The block's own rotary helper, so that the scores are those of the attention that ran.
    rotate = sys.modules[type(attention).__module__].apply_rotary_pos_emb_vision
    cos, sin = captured["position_embeddings"]
    rotated_query, rotated_key = rotate(query, key, cos, sin)

    frame_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).tolist()
    bounds = captured["cu_seqlens"].tolist()
    if [end - start for start, end in pairwise(bounds)] != frame_sizes:
        raise RuntimeError(
            f"the scoring block of {type(vision_model).__name__} does not attend over whole images and frames"
        )
    scores = torch.empty(num_patches, dtype=torch.float32, device=qkv.device)
    for start, end in pairwise(bounds):
        segment = slice(start, end)
        scores[segment] = received_attention(
            rotated_query[None, segment], rotated_key[None, segment], float(attention.scaling), query_chunk
        )[0]
    unit = merge * merge  # a merge unit's patches are consecutive
    unit_scores = scores.view(-1, unit).sum(dim=1)
    unit_keys = key.mean(dim=1).view(-1, unit, key.shape[-1]).mean(dim=1)
    if layout.unit_order is not None:
        restore = torch.argsort(layout.unit_order(vision_model, grid_thw).to(unit_scores.device))
        unit_scores, unit_keys = unit_scores[restore], unit_keys[restore]

    probes: list[ProbeOutput] = []
    offset = 0
    for frames, height, width in grid_thw.tolist():
        rows, cols = height // merge, width // merge
        for _ in range(frames):
            span = slice(offset, offset + rows * cols)
            probes.append(
                ProbeOutput(
                    features=merged[span][None],
                    scores=unit_scores[span][None],
                    keys=unit_keys[span][None],
                    has_cls=False,
                    num_prefix_tokens=0,
                    grid=(rows, cols),
                )
            )
            offset += rows * cols
    return probes


@dataclass
class QwenEncoded(EncodedImages):
    """EncodedImages whose entries (images and videos, in text order) each name their modality.

    An entry is a whole video, or one temporal slice of it on families whose slices are separate
    placeholder runs (`Qwen2VLAdapter.video_slice_runs`). `deepstack[layer][entry]` holds the
    entry's reduced deepstack features (same tokens, same order as `features[entry]`), on families
    that have them; empty otherwise.
    """

    modalities: list[str] = field(default_factory=list)
    deepstack: list[list[torch.Tensor]] = field(default_factory=list)


@dataclass
class _ReducedVisual:
    features: torch.Tensor  # (tokens, text_hidden * (1 + deepstack layers)), ascending slot order
    slots: torch.Tensor  # (tokens,) ascending, within the visual's placeholder run
    reductions: list[Reduction]

    def slices(self, units_per_slice: int, count: int) -> list[_ReducedVisual]:
        """One visual per temporal slice, slots counted within the slice's own run."""
        frame = torch.div(self.slots, units_per_slice, rounding_mode="floor")
        return [
            _ReducedVisual(
                self.features[frame == index], self.slots[frame == index] - index * units_per_slice, [reduction]
            )
            for index, reduction in zip(range(count), self.reductions, strict=True)
        ]


# --- the adapter ---------------------------------------------------------------------------------
class Qwen2VLAdapter(Adapter):
    families = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    image_input_keys = ("pixel_values", "pixel_values_videos")
    family_name: ClassVar[str] = "Qwen2-VL / Qwen2.5-VL"
    # The tower also returns deepstack features (Qwen3-VL), reduced like the main ones.
    deepstack: ClassVar[bool] = False
    # Each temporal slice of a video is its own placeholder run, with text (timestamps) between (Qwen3-VL, Qwen3.5).
    video_slice_runs: ClassVar[bool] = False
    # M-RoPE: the unreduced prompt's 3-D positions, always (positions="compact" and "original" alike).
    keeps_original_positions = True
    serves_probes = False  # the tower is probed per image by probe_qwen_tower
    supports_adaptive = True

    @classmethod
    def model_position_ids(cls, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """(3, batch, length) M-RoPE positions, as the model's own `get_rope_index` computes them."""
        return mrope_positions(model, inputs)

    def vision_tower(self) -> nn.Module:
        return self.model.model.visual

    @property
    def merge_size(self) -> int:
        return int(self.vision_tower().spatial_merge_size)

    def resolve_tower_info(self) -> TowerInfo:
        tower = self.vision_tower()
        # Unsupported towers, and towers without a block to score with, fail here, before the model is touched.
        _qwen_layout(tower).score_block(tower)
        layout = TowerLayout(
            layers=lambda t: t.blocks, attention=lambda block: block.attn, has_cls=False, num_prefix_tokens=lambda c: 0
        )
        return resolve_tower(tower, layout)

    def resolve_feature_layer(self, layer: int | None) -> int:
        # The visual tokens are the merger's output after the final block: there is no layer to choose.
        if layer not in (None, -1):
            raise ValueError(
                f"feature_layer: {self.family_name} visual tokens are the merger output of the tower's final "
                f"block; leave feature_layer as None (or -1), got {layer}"
            )
        return -1

    def check_budget(self) -> None:
        # Qwen's resolution is dynamic: the budget is checked against each image's and frame's merged
        # token count in prepare(), where the error can name the image. A budget above what the
        # processor's max_pixels allows for any image can never fit: refused here.
        most = processor_max_units(self.processor_source)
        if most is not None and self.config.budget_scope == "per_crop" and self.config.tokens > most:
            where = " (the most merged tokens one image can yield under the processor's max_pixels)"
            raise budget_error(self.config, most, where)

    def token_id(self, modality: str) -> int:
        value = getattr(self.model.config, f"{modality}_token_id", None)
        if not isinstance(value, int):
            raise ValueError(f"model config has no {modality}_token_id")
        return value

    @property
    def placeholder_token_ids(self) -> tuple[int, ...]:
        return tuple(self.token_id(modality) for modality in MODALITY_INPUTS)

    # --- inputs ---------------------------------------------------------------------------------
    def _grids(self, inputs: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The (t, h, w) grid of every modality whose pixels are given, validated against them."""
        grids: dict[str, torch.Tensor] = {}
        for modality, (pixel_key, grid_key) in MODALITY_INPUTS.items():
            if inputs.get(pixel_key) is None:
                continue
            if inputs.get(grid_key) is None:
                raise ValueError(
                    f"inputs['{grid_key}'] is required with inputs['{pixel_key}']; pass the processor's output"
                )
            grid = check_grid_thw(f"inputs['{grid_key}']", inputs[grid_key], self.merge_size)
            _check_patches(f"inputs['{pixel_key}']", inputs[pixel_key], grid)
            grids[modality] = grid
        return grids

    def _counts(self, grids: Mapping[str, torch.Tensor]) -> dict[str, list[int]]:
        """Placeholders per placeholder run: an image's merged tokens; a video's over all its temporal
        slices, or one entry per slice where slices are separate runs (`video_slice_runs`)."""
        counts = {modality: (grid.prod(dim=1) // self.merge_size**2).tolist() for modality, grid in grids.items()}
        if self.video_slice_runs and "video" in grids:
            grid = grids["video"]
            counts["video"] = torch.repeat_interleave(
                grid[:, 1] * grid[:, 2] // self.merge_size**2, grid[:, 0]
            ).tolist()
        return counts

    def _text_order(self, inputs: Mapping[str, Any]) -> list[tuple[str, int]]:
        """(modality, index within the modality) of every image and video, in text order."""
        input_ids, attention_mask = sequence_inputs(inputs)
        kinds = {self.token_id(modality): modality for modality in MODALITY_INPUTS}
        return placeholder_order(input_ids, attention_mask, kinds, self._counts(self._grids(inputs)))

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        counts = self._counts(self._grids(inputs))
        return [counts[modality][index] for modality, index in self._text_order(inputs)]

    # --- encoding -------------------------------------------------------------------------------
    def _reduce_frame(self, probe: ProbeOutput, config: VisionZipConfig, modality: str, index: int) -> Reduction:
        units = probe.features.shape[1]
        if config.fewest_tokens > units:
            rows, cols = probe.grid
            per = "temporal slice" if modality == "video" else "image"
            raise budget_error(
                config, units, f" (the merged tokens {modality} {index} yields per {per}: a {rows}x{cols} grid)"
            )
        reduced = self.run_method(probe, config)
        return reduced if isinstance(reduced, Reduction) else reduced[0]

    def _reduce_visual(self, probes: list[ProbeOutput], modality: str, index: int) -> _ReducedVisual:
        """Reduce an image (one probe) or a video (one probe per temporal slice) and order it by slot."""
        config = self.config.per_unit(len(probes))
        reductions = [self._reduce_frame(probe, config, modality, index) for probe in probes]
        keep = None
        if self.config.temporal_threshold is not None and len(probes) > 1:
            width = probes[0].features.shape[-1] // (1 + self.deepstack_layers)  # compare the main features
            keep = temporal_keep_mask(
                torch.cat([probe.features[..., :width] for probe in probes]),
                torch.cat([reduction.kept_indices for reduction in reductions]),
                config.tokens,
                self.config.temporal_threshold,
            )
        units_per_frame = probes[0].features.shape[1]
        features, slots = [], []
        for frame, reduction in enumerate(reductions):
            frame_features, frame_slots = reduction.features[0], reduced_slots(reduction)
            if keep is not None:
                frame_features, frame_slots = frame_features[keep[frame]], frame_slots[keep[frame]]
            order = frame_slots.argsort()
            features.append(frame_features[order])
            slots.append(frame_slots[order] + frame * units_per_frame)
        return _ReducedVisual(torch.cat(features), torch.cat(slots), reductions)

    @property
    def deepstack_layers(self) -> int:
        return len(self.vision_tower().deepstack_visual_indexes) if self.deepstack else 0

    def _encode_modality(self, modality: str, pixels: torch.Tensor, grid: torch.Tensor) -> list[_ReducedVisual]:
        """One reduced visual per placeholder run of `modality`, in `grid` order."""
        tower = self.vision_tower()
        probes = probe_qwen_tower(tower, pixels.to(tower.dtype), grid, deepstack=self.deepstack)
        visuals, first = [], 0
        for index, (frames, height, width) in enumerate(grid.tolist()):
            visual = self._reduce_visual(probes[first : first + frames], modality, index)
            if modality == "video" and self.video_slice_runs:
                visuals.extend(visual.slices(height * width // self.merge_size**2, frames))
            else:
                visuals.append(visual)
            first += frames
        return visuals

    def encode(self, inputs: Mapping[str, Any]) -> QwenEncoded:
        order = self._text_order(inputs)
        grids = self._grids(inputs)
        counts = self._counts(grids)
        reduced = {
            modality: self._encode_modality(modality, inputs[MODALITY_INPUTS[modality][0]], grid)
            for modality, grid in grids.items()
        }
        visuals = [reduced[modality][index] for modality, index in order]
        # Main and deepstack features were reduced together (concatenated channels); split them again.
        parts = [visual.features.chunk(1 + self.deepstack_layers, dim=-1) for visual in visuals]
        return QwenEncoded(
            features=[part[0] for part in parts],
            full_counts=[counts[modality][index] for modality, index in order],
            slots=[visual.slots for visual in visuals],
            reductions=[reduction for visual in visuals for reduction in visual.reductions],
            modalities=[modality for modality, _ in order],
            deepstack=[[part[1 + layer] for part in parts] for layer in range(self.deepstack_layers)],
        )

    # --- the image cache -----------------------------------------------------------------------
    def visual_units(self, inputs: Mapping[str, Any]) -> list[VisualUnit] | None:
        grids = self._grids(inputs)
        if self.video_slice_runs and "video" in grids:
            return None  # a video spans several placeholder runs: cached per call
        counts = self._counts(grids)
        units: dict[str, list[VisualUnit]] = {}
        for modality, grid in grids.items():
            pixels = inputs[MODALITY_INPUTS[modality][0]]
            bounds = [0, *grid.prod(dim=1).cumsum(0).tolist()]
            units[modality] = [
                VisualUnit(modality, (pixels[start:end],), tuple(row), count, self.token_id(modality))
                for (start, end), row, count in zip(pairwise(bounds), grid.tolist(), counts[modality], strict=True)
            ]
        return [units[modality][index] for modality, index in self._text_order(inputs)]

    def whole_call_units(self, inputs: Mapping[str, Any]) -> list[VisualUnit]:
        # Per-call entries still name their modality: the model receives images and videos apart.
        units = super().whole_call_units(inputs)
        kinds = [modality for modality, _ in self._text_order(inputs)]
        return [
            replace(unit, modality=modality, token_id=self.token_id(modality))
            for unit, modality in zip(units, kinds, strict=True)
        ]

    def units_inputs(self, units: Sequence[VisualUnit]) -> dict[str, Any]:
        result: dict[str, Any] = {"input_ids": units_input_ids(units)}
        for modality, (pixel_key, grid_key) in MODALITY_INPUTS.items():
            chosen = [unit for unit in units if unit.modality == modality]
            if chosen:
                result[pixel_key] = torch.cat([unit.tensors[0] for unit in chosen])
                result[grid_key] = torch.tensor([list(unit.layout) for unit in chosen])
        return result

    # A cached item holds its main features followed, along the channels, by its deepstack features.
    def cached_features(self, encoded: EncodedImages, entry: int) -> torch.Tensor:
        if not isinstance(encoded, QwenEncoded) or not encoded.deepstack:
            return encoded.features[entry]
        return torch.cat([encoded.features[entry], *(layer[entry] for layer in encoded.deepstack)], dim=-1)

    def cached_width(self) -> int:
        return self.text_width() * (1 + self.deepstack_layers)

    def join_encoded(self, visuals: Sequence[CachedVisual], reductions: list[Reduction]) -> QwenEncoded:
        parts = [visual.features.chunk(1 + self.deepstack_layers, dim=-1) for visual in visuals]
        return QwenEncoded(
            features=[part[0] for part in parts],
            full_counts=[visual.full_count for visual in visuals],
            slots=[visual.slots for visual in visuals],
            reductions=reductions,
            modalities=[visual.modality for visual in visuals],
            deepstack=[[part[1 + layer] for part in parts] for layer in range(self.deepstack_layers)],
        )

    def encoder_output(self, features: list[torch.Tensor], deepstack: list[list[torch.Tensor]]) -> Any:
        """What the model's `mm_encoder_outputs` expects for one modality (Qwen3-VL adds deepstack features)."""
        return BaseModelOutputWithPooling(pooler_output=features)

    def reduce_for_view(self, processed: Mapping[str, Any]) -> tuple[torch.Tensor, Reduction, int]:
        """Reduce the first image of an image processor's output for `vlmzip.viz`.

        Returns its pixels as a (1, channels, height, width) normalised image (the patches put back
        in place), the reduction over its merge units (raster order) and a merge unit's side in pixels.
        """
        grid = check_grid_thw("image_grid_thw", processed.get("image_grid_thw"), self.merge_size)[:1]
        patches = int(grid.prod())
        pixels = _check_patches("pixel_values", processed.get("pixel_values"), grid)[:patches]
        (visual,) = self._encode_modality("image", pixels, grid)
        tower = self.vision_tower()
        patch, merge, temporal = int(tower.config.patch_size), self.merge_size, int(tower.config.temporal_patch_size)
        _, height, width = grid[0].tolist()
        # The processor's flattening: rows (h/m, w/m, m, m), columns (channels, temporal, patch, patch).
        blocks = pixels.float().view(height // merge, width // merge, merge, merge, -1, temporal, patch, patch)
        image = blocks[:, :, :, :, :, 0].permute(4, 0, 2, 5, 1, 3, 6).reshape(-1, height * patch, width * patch)
        return image[None], visual.reductions[0], patch * merge

    def attach_features(self, prepared: dict[str, Any], encoded: EncodedImages) -> None:
        if not isinstance(encoded, QwenEncoded):
            raise TypeError(f"encoded must come from {type(self).__name__}.encode, got {type(encoded).__name__}")
        outputs = {}
        for modality in MODALITY_INPUTS:
            mine = [entry for entry, m in enumerate(encoded.modalities) if m == modality]
            if mine:
                deepstack = [[layer[entry] for entry in mine] for layer in encoded.deepstack]
                outputs[modality] = self.encoder_output([encoded.features[entry] for entry in mine], deepstack)
        prepared["mm_encoder_outputs"] = outputs
        for key in UNREDUCED_LAYOUT_KEYS:
            prepared.pop(key, None)

    def prepare(
        self, inputs: Mapping[str, Any], padding_side: PaddingSide | None = None, cache: Any = _APPLIED
    ) -> dict[str, Any]:
        if not isinstance(inputs, Mapping) or all(inputs.get(key) is None for key in self.image_input_keys):
            return super().prepare(inputs, padding_side, cache)
        if inputs.get("position_ids") is not None:
            return super().prepare(inputs, padding_side, cache)  # refused there with the shared message
        self.full_counts(inputs)  # the text must match the images before positions are computed from it
        return prepare_with_positions(
            lambda rows: super(Qwen2VLAdapter, self).prepare(rows, padding_side, cache), self.model, inputs
        )


__all__ = ["QWEN_TOWER_LAYOUTS", "Qwen2VLAdapter", "mrope_positions", "probe_qwen_tower", "reduced_slots"]
