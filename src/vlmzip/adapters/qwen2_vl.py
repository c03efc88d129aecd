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
  (`get_rope_index` on the original input). Dominant tokens sit in their own slots; a contextual
  token sits in the slot of the unit it was merged onto (VisionZip's target), so the reduced tokens
  of an image reach the language model in raster order. Text keeps its original positions too: it
  continues from the full image's maximum position + 1, as without VisionZip, so positions stay
  monotone per sample and decoding continues from the last one.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.vision_utils import get_vision_window_index

from vlmzip.adapters.base import Adapter, EncodedImages, PaddingSide, placeholder_order
from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction, anchor_indices
from vlmzip.probe import (
    DEFAULT_QUERY_CHUNK,
    ProbeOutput,
    TowerInfo,
    TowerLayout,
    received_attention,
    resolve_tower,
)
from vlmzip.video import temporal_keep_mask

# mm_token_type_ids values of Qwen's processors (0 is text).
MODALITY_TYPE_IDS: dict[str, int] = {"image": 1, "video": 2}
# (pixels, grid) input keys per modality, in the order Qwen's model encodes them.
MODALITY_INPUTS: dict[str, tuple[str, str]] = {
    "image": ("pixel_values", "image_grid_thw"),
    "video": ("pixel_values_videos", "video_grid_thw"),
}
# Inputs that describe the unreduced layout; after prepare() the explicit position_ids replace them.
UNREDUCED_LAYOUT_KEYS = ("image_grid_thw", "video_grid_thw", "second_per_grid_ts")
# The original rope positions ride through the shared shrinking as three (batch, length) rows.
_ROPE_ROW_KEYS = ("_visionzip_rope_t", "_visionzip_rope_h", "_visionzip_rope_w")


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
    return pixel_values


def probe_qwen_tower(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: torch.Tensor,
    *,
    query_chunk: int = DEFAULT_QUERY_CHUNK,
) -> list[ProbeOutput]:
    """Run a Qwen2-VL / Qwen2.5-VL tower and return one `ProbeOutput` per attention segment.

    A segment is an image, or one temporal slice of a video, in `grid_thw` order. Its tokens are
    the merge units the language model sees: `features` (1, units, out_hidden) are the merger's
    output, `scores` (1, units) the attention the unit's patches receive in the scoring block
    (averaged over queries, summed over heads and over the unit's patches), `keys` (1, units, head_dim)
    the block's keys averaged over heads and over the unit's patches, `grid` the merged (rows, cols).
    Only the scoring block's `qkv` output and arguments are captured; the tower runs on its own backend.
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
        merged = vision_model(pixel_values, grid_thw=grid_thw).pooler_output
    finally:
        for handle in handles:
            handle.remove()

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


def reduced_slots(reduction: Reduction) -> torch.Tensor:
    """For each reduced token (in `reduction.features` order), the merge unit whose slot it takes.

    Dominant tokens take their own unit; contextual token j the unit it was merged onto
    (`core.anchor_indices`, of the first row of `reduction`).
    """
    return anchor_indices(reduction)[0]


@dataclass
class QwenEncoded(EncodedImages):
    """EncodedImages whose entries (images and videos, in text order) each name their modality."""

    modalities: list[str] = field(default_factory=list)


@dataclass
class _ReducedVisual:
    features: torch.Tensor  # (tokens, text_hidden), ascending slot order
    slots: torch.Tensor  # (tokens,) ascending, within the visual's placeholder run
    reductions: list[Reduction]


# --- M-RoPE positions ----------------------------------------------------------------------------
def _sequence(inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of a processor output, validated; the mask defaults to all ones."""
    input_ids = inputs.get("input_ids")
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(
            "inputs['input_ids'] must be a (batch, length) integer tensor; pass the processor's output with "
            "return_tensors='pt'"
        )
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"inputs['attention_mask'] must be a tensor of the shape of input_ids {tuple(input_ids.shape)}, "
            f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}"
        )
    return input_ids, attention_mask


def mrope_positions(model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor:
    """(3, batch, length) M-RoPE positions of a Qwen2-VL / Qwen2.5-VL processor output, as the model computes them.

    Uses the model's own `get_rope_index`; `mm_token_type_ids` is derived from the placeholder
    tokens when the inputs lack it. Text-only inputs get the same position on all three axes.
    """
    input_ids, attention_mask = _sequence(inputs)
    grids = {modality: inputs.get(grid_key) for modality, (_, grid_key) in MODALITY_INPUTS.items()}
    if all(grid is None for grid in grids.values()):
        text_positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        return text_positions[None].expand(3, -1, -1).clone()
    token_types = inputs.get("mm_token_type_ids")
    if token_types is None:
        token_types = torch.zeros_like(input_ids)
        for modality, type_id in MODALITY_TYPE_IDS.items():
            token_types[input_ids == getattr(model.config, f"{modality}_token_id")] = type_id
    extra = {"second_per_grid_ts": inputs["second_per_grid_ts"]} if inputs.get("second_per_grid_ts") is not None else {}
    positions, _ = model.model.get_rope_index(
        input_ids,
        mm_token_type_ids=token_types,
        image_grid_thw=grids["image"],
        video_grid_thw=grids["video"],
        attention_mask=attention_mask,
        **extra,
    )
    return positions


# --- the adapter ---------------------------------------------------------------------------------
class Qwen2VLAdapter(Adapter):
    families = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    image_input_keys = ("pixel_values", "pixel_values_videos")
    # M-RoPE: the unreduced prompt's 3-D positions, always (positions="compact" and "original" alike).
    keeps_original_positions = True
    supports_adaptive = True

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

    def _resolve_feature_layer(self) -> int:
        # The visual tokens are the merger's output after the final block: there is no layer to choose.
        if self.config.feature_layer not in (None, -1):
            raise ValueError(
                "feature_layer: Qwen2-VL / Qwen2.5-VL visual tokens are the merger output of the tower's final "
                f"block; leave feature_layer as None (or -1), got {self.config.feature_layer}"
            )
        return -1

    def check_budget(self) -> None:
        # Qwen's resolution is dynamic: the budget is checked against each image's and frame's merged
        # token count in prepare(), where the error can name the image.
        return None

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
        """Placeholders per image / video: its merged token count over all temporal slices."""
        return {modality: (grid.prod(dim=1) // self.merge_size**2).tolist() for modality, grid in grids.items()}

    def _text_order(self, inputs: Mapping[str, Any]) -> list[tuple[str, int]]:
        """(modality, index within the modality) of every image and video, in text order."""
        input_ids, attention_mask = _sequence(inputs)
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
            raise ValueError(
                f"dominant + contextual must be <= {units} (the merged tokens {modality} {index} yields per "
                f"{'temporal slice' if modality == 'video' else 'image'}: a {rows}x{cols} grid), got "
                f"{config.dominant} + {config.contextual} = {config.tokens}"
            )
        reduced = self.run_method(probe, config)
        return reduced if isinstance(reduced, Reduction) else reduced[0]

    def _reduce_visual(self, probes: list[ProbeOutput], modality: str, index: int) -> _ReducedVisual:
        """Reduce an image (one probe) or a video (one probe per temporal slice) and order it by slot."""
        config = self.config.per_unit(len(probes))
        reductions = [self._reduce_frame(probe, config, modality, index) for probe in probes]
        keep = None
        if self.config.temporal_threshold is not None and len(probes) > 1:
            keep = temporal_keep_mask(
                torch.cat([probe.features for probe in probes]),
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

    def _encode_modality(self, modality: str, pixels: torch.Tensor, grid: torch.Tensor) -> list[_ReducedVisual]:
        tower = self.vision_tower()
        probes = probe_qwen_tower(tower, pixels.to(tower.dtype), grid)
        visuals, first = [], 0
        for index, frames in enumerate(grid[:, 0].tolist()):
            visuals.append(self._reduce_visual(probes[first : first + frames], modality, index))
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
        return QwenEncoded(
            features=[visual.features for visual in visuals],
            full_counts=[counts[modality][index] for modality, index in order],
            slots=[visual.slots for visual in visuals],
            reductions=[reduction for visual in visuals for reduction in visual.reductions],
            modalities=[modality for modality, _ in order],
        )

    def attach_features(self, prepared: dict[str, Any], encoded: EncodedImages) -> None:
        if not isinstance(encoded, QwenEncoded):
            raise TypeError(f"encoded must come from {type(self).__name__}.encode, got {type(encoded).__name__}")
        outputs = {}
        for modality in MODALITY_INPUTS:
            features = [f for f, m in zip(encoded.features, encoded.modalities, strict=True) if m == modality]
            if features:
                outputs[modality] = BaseModelOutputWithPooling(pooler_output=features)
        prepared["mm_encoder_outputs"] = outputs
        for key in UNREDUCED_LAYOUT_KEYS:
            prepared.pop(key, None)

    def prepare(self, inputs: Mapping[str, Any], padding_side: PaddingSide | None = None) -> dict[str, Any]:
        if not isinstance(inputs, Mapping) or all(inputs.get(key) is None for key in self.image_input_keys):
            return super().prepare(inputs, padding_side)
        if inputs.get("position_ids") is not None:
            return super().prepare(inputs, padding_side)  # refused there with the shared message
        self.full_counts(inputs)  # the text must match the images before positions are computed from it
        positions = mrope_positions(self.model, inputs)
        rows = dict(zip(_ROPE_ROW_KEYS, positions.unbind(0), strict=True))
        prepared = super().prepare({**inputs, **rows}, padding_side)
        prepared["position_ids"] = torch.stack([prepared.pop(key) for key in _ROPE_ROW_KEYS])
        return prepared


__all__ = ["QWEN_TOWER_LAYOUTS", "Qwen2VLAdapter", "mrope_positions", "probe_qwen_tower", "reduced_slots"]
