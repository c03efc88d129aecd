"""M-RoPE bookkeeping shared by the Qwen vision-language families (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Qwen3.5).

These models give every token a 3-D rope position (temporal, height, width) computed from the
unreduced prompt by the model's own `get_rope_index`. VisionZip keeps those positions: every
surviving token keeps the position it has in the unreduced prompt. Dominant tokens sit in their own
slots; a contextual token sits in the slot of the unit it was merged onto (VisionZip's target), so
the reduced tokens of an image reach the language model in raster order. Text keeps its original
positions too: it continues from the full image's maximum position + 1, as without VisionZip, so
positions stay monotone per sample and decoding continues from the last one.

`prepare_with_positions` runs an adapter's shared `prepare` with the original positions riding
through the placeholder shrinking as three extra (batch, length) rows, and returns them as the
explicit (3, batch, length) `position_ids` the model then uses instead of recomputing them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vlmzip.core import Reduction, anchor_indices

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
ROPE_ROW_KEYS = ("_visionzip_rope_t", "_visionzip_rope_h", "_visionzip_rope_w")


def sequence_inputs(inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
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
    """(3, batch, length) M-RoPE positions of a Qwen-VL processor output, as the model computes them.

    Uses the model's own `get_rope_index`; `mm_token_type_ids` is derived from the placeholder
    tokens when the inputs lack it. Text-only inputs get the same position on all three axes.
    """
    input_ids, attention_mask = sequence_inputs(inputs)
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


def reduced_slots(reduction: Reduction) -> torch.Tensor:
    """For each reduced token (in `reduction.features` order), the merge unit whose slot it takes.

    Dominant tokens take their own unit; contextual token j the unit it was merged onto
    (`core.anchor_indices`, of the first row of `reduction`).
    """
    return anchor_indices(reduction)[0]


def prepare_with_positions(
    shared_prepare: Callable[[Mapping[str, Any]], dict[str, Any]], model: nn.Module, inputs: Mapping[str, Any]
) -> dict[str, Any]:
    """`shared_prepare(inputs)` with the original M-RoPE positions of the kept tokens as `position_ids`.

    `shared_prepare` is the adapter's placeholder shrinking (`Adapter.prepare`), which drops and
    re-pads every (batch, length) tensor alike, the three position rows included.
    """
    positions = mrope_positions(model, inputs)
    rows = dict(zip(ROPE_ROW_KEYS, positions.unbind(0), strict=True))
    prepared = shared_prepare({**inputs, **rows})
    prepared["position_ids"] = torch.stack([prepared.pop(key) for key in ROPE_ROW_KEYS])
    return prepared


__all__ = [
    "MODALITY_INPUTS",
    "MODALITY_TYPE_IDS",
    "ROPE_ROW_KEYS",
    "UNREDUCED_LAYOUT_KEYS",
    "mrope_positions",
    "prepare_with_positions",
    "reduced_slots",
    "sequence_inputs",
]
