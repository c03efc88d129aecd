"""What every family shares: placeholder shrinking, re-padding, and the per-instance state.

A family adapter says where the tower and projector are, how many placeholders the processor
emitted per image, and how to turn pixels into reduced, projected features. This module turns
that into inputs whose image placeholder runs are `dominant + contextual` long per image, with the
compressed features handed to the model through its own precomputed-features path
(`mm_encoder_outputs`), so the language model never sees the full-length sequence.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction
from vlmzip.methods import get_method
from vlmzip.probe import ProbeOutput, TowerInfo, probe_vision_tower, resolve_tower

PaddingSide = Literal["left", "right"]
IGNORE_INDEX = -100  # transformers' label value for positions without loss


@dataclass
class EncodedImages:
    """Reduced, projected features of every image in a batch, in placeholder order.

    features: one (tokens_i, text_hidden) tensor per image, as the language model receives it.
    full_counts: placeholders the processor emitted for each image.
    slots: for each image, which placeholder positions (within its run, ascending) the reduced
        tokens occupy; None keeps the first `tokens_i` positions. Families whose position ids
        depend on the slot (M-RoPE) set it.
    reductions: the core's per-batch results, for visualisation and inspection.
    """

    features: list[torch.Tensor]
    full_counts: list[int]
    slots: list[torch.Tensor] | None = None
    reductions: list[Reduction] = field(default_factory=list)


class Adapter:
    """Base class of the per-family adapters; one instance lives on each patched model."""

    families: ClassVar[tuple[str, ...]] = ()  # model class names this adapter handles
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)  # consumed by prepare()
    modality: ClassVar[str] = "image"

    def __init__(self, model: nn.Module, config: VisionZipConfig) -> None:
        self.model = model
        self.config = config
        self.tower_info: TowerInfo = self.resolve_tower_info()
        self.feature_layer = self._resolve_feature_layer()
        self.method = get_method(config.method)
        self.check_budget()

    # --- what each family provides -------------------------------------------------------
    def vision_tower(self) -> nn.Module:
        raise NotImplementedError

    def resolve_tower_info(self) -> TowerInfo:
        """The tower's layout; families whose tower has its own probe (e.g. Qwen2-VL) override this."""
        return resolve_tower(self.vision_tower())

    def tokens_per_unit(self) -> int:
        """Tokens the tower yields per image (or crop / frame) at the model's native resolution."""
        raise NotImplementedError

    @property
    def token_pixels(self) -> int:
        """Side in pixels of the square one tower token covers (larger where patches are merged into one)."""
        return self.tower_info.patch_size

    def unit_labels(self, count: int) -> list[str] | None:
        """Captions of the `count` crops / tiles of one processed image in pixel order; None: the default."""
        return None

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        """Placeholders the processor emitted per image, computed without running the tower."""
        raise NotImplementedError

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------
    @property
    def image_token_id(self) -> int:
        config = self.model.config
        token_id = getattr(config, f"{self.modality}_token_id", None)
        if token_id is None:
            token_id = getattr(config, f"{self.modality}_token_index", None)
        if token_id is None:
            raise ValueError(f"model config has no {self.modality}_token_id")
        return int(token_id)

    @property
    def placeholder_token_ids(self) -> tuple[int, ...]:
        """Placeholder token ids whose runs `full_counts` and `encode` cover, in text order."""
        return (self.image_token_id,)

    def placeholder_blocks(
        self, inputs: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor, full_counts: list[int]
    ) -> list[tuple[int, int, int]]:
        """(sample, start, length) of each image's placeholder run, in image order (see `find_placeholder_blocks`).

        Families whose runs hold layout tokens between the placeholders (Mistral 3's row breaks) override this.
        """
        return find_placeholder_blocks(input_ids, attention_mask, self.placeholder_token_ids, full_counts)

    def attach_features(self, prepared: dict[str, Any], encoded: EncodedImages) -> None:
        """Hand the reduced features to the model's precomputed-features path (after shrinking)."""
        prepared["mm_encoder_outputs"] = {
            self.modality: BaseModelOutputWithPooling(pooler_output=list(encoded.features))
        }

    def _resolve_feature_layer(self) -> int:
        layer = self.config.feature_layer
        if layer is None:
            layer = getattr(self.model.config, "vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(
                f"vision_feature_layer={layer!r}: VisionZip needs one feature layer; set "
                "VisionZipConfig(feature_layer=...) to choose it"
            )
        self.tower_info.feature_layer_index(layer)  # raises when out of range
        return layer

    def check_budget(self) -> None:
        available = self.tokens_per_unit()
        if self.config.tokens > available:
            raise ValueError(
                f"dominant + contextual must be <= {available} (the tokens this model's tower yields per "
                f"image), got {self.config.dominant} + {self.config.contextual} = {self.config.tokens}"
            )

    def reduce(self, pixel_values: torch.Tensor, **tower_kwargs: Any) -> tuple[ProbeOutput, Reduction]:
        """Probe the tower at the feature layer and apply the configured method."""
        probe = probe_vision_tower(self.vision_tower(), pixel_values, self.feature_layer, **tower_kwargs)
        num_tokens = probe.features.shape[1]
        if self.config.tokens > num_tokens:
            raise ValueError(
                f"dominant + contextual must be <= {num_tokens} (the tokens the tower yields for these "
                f"pixel_values), got {self.config.tokens}"
            )
        return probe, self.method(probe, self.config)

    def pad_token_id(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        config = self.model.config
        for source in (config, getattr(config, "text_config", None), getattr(self.model, "generation_config", None)):
            value = getattr(source, "pad_token_id", None) if source is not None else None
            if isinstance(value, int):
                return value
        padded = input_ids[attention_mask == 0]
        return int(padded[0]) if padded.numel() else 0

    def prepare(self, inputs: Mapping[str, Any], padding_side: PaddingSide | None = None) -> dict[str, Any]:
        if not isinstance(inputs, Mapping):
            raise TypeError(f"inputs must be the processor's output (a mapping), got {type(inputs).__name__}")
        prepared = dict(inputs)
        if all(prepared.get(key) is None for key in self.image_input_keys):
            return prepared  # text only, or already prepared
        input_ids = prepared.get("input_ids")
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
            raise ValueError(
                "inputs['input_ids'] must be a (batch, length) integer tensor when images are given; "
                "pass the processor's output with return_tensors='pt'"
            )
        if prepared.get("position_ids") is not None:
            raise ValueError("inputs['position_ids'] is not supported: leave it out, the model derives positions")
        if padding_side not in (None, "left", "right"):
            raise ValueError(f"padding_side must be 'left', 'right' or None, got {padding_side!r}")
        attention_mask = prepared.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"inputs['attention_mask'] must have the shape of input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )

        full_counts = self.full_counts(prepared)
        blocks = self.placeholder_blocks(prepared, input_ids, attention_mask, full_counts)
        encoded = self.encode(prepared)
        new_counts = [int(f.shape[0]) for f in encoded.features]
        keep = placeholder_keep_mask(attention_mask, blocks, new_counts, encoded.slots)

        if padding_side is None:
            right_padded = bool((attention_mask[:, -1] == 0).any())
            padding_side = "right" if right_padded else "left"
        pad_values = {"input_ids": self.pad_token_id(input_ids, attention_mask), "labels": IGNORE_INDEX}
        for key, value in list(prepared.items()):
            if isinstance(value, torch.Tensor) and value.shape == input_ids.shape and key != "attention_mask":
                prepared[key] = compact_and_pad(value, keep, pad_values.get(key, 0), padding_side)
        prepared["attention_mask"] = compact_and_pad(torch.ones_like(attention_mask), keep, 0, padding_side)
        for key in self.image_input_keys:
            prepared.pop(key, None)
        self.attach_features(prepared, encoded)
        self.last_encoded = encoded
        return prepared


def prepare_unreduced(model: nn.Module, inputs: Mapping[str, Any], modality: str = "image") -> dict[str, Any]:
    """The same hand-over as `Adapter.prepare`, with the model's own full-length features.

    Encodes the images exactly as `generate()` does before prefill (the base model's
    `get_{modality}_features`, called with the inputs its signature names), so that timing the
    language model on the result measures the unreduced baseline with the tower kept out of it.
    """
    prepared = dict(inputs)
    encoder = getattr(model.base_model, f"get_{modality}_features")
    names = [name for name in inspect.signature(encoder).parameters if name != "kwargs" and name in prepared]
    encoded = encoder(**{name: prepared[name] for name in names}, return_dict=True)
    for name in names:
        prepared.pop(name)
    prepared["mm_encoder_outputs"] = {modality: encoded}
    return prepared


def find_placeholder_blocks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_id: int | Sequence[int], full_counts: Sequence[int]
) -> list[tuple[int, int, int]]:
    """(sample, start, length) of each image's placeholder run, in image order.

    Images are matched to placeholders in order, run by run; adjacent images (no text between)
    are told apart by their expected counts. Raises when the counts do not line up.
    """
    token_ids = torch.tensor([token_id] if isinstance(token_id, int) else list(token_id), device=input_ids.device)
    is_placeholder = torch.isin(input_ids, token_ids) & attention_mask.bool()
    per_sample = is_placeholder.sum(dim=1).tolist()
    expected_total = sum(full_counts)
    if sum(per_sample) != expected_total:
        raise ValueError(
            f"inputs: the text holds {sum(per_sample)} image placeholder tokens but the {len(full_counts)} "
            f"image(s) need {expected_total} ({list(full_counts)} each); pass the processor's unmodified output "
            "for the same images and text"
        )
    blocks: list[tuple[int, int, int]] = []
    image = 0
    for sample, count in enumerate(per_sample):
        positions = is_placeholder[sample].nonzero().squeeze(1).tolist()
        cursor = 0
        while cursor < count:
            if image >= len(full_counts):
                raise ValueError("inputs: more image placeholder runs than images")
            size = full_counts[image]
            run = positions[cursor : cursor + size]
            if len(run) != size or run[-1] - run[0] != size - 1:
                raise ValueError(
                    f"inputs: image {image} needs a run of {size} consecutive placeholder tokens in sample "
                    f"{sample}; the text does not match the images"
                )
            blocks.append((sample, run[0], size))
            cursor += size
            image += 1
    return blocks


def placeholder_order(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    kinds: Mapping[int, str],
    counts: Mapping[str, Sequence[int]],
) -> list[tuple[str, int]]:
    """(kind, index within its kind) of every placeholder run, in text order, for inputs mixing kinds.

    `kinds` maps each placeholder token id to a kind ("image", "video"); `counts[kind][i]` is the
    run length of item i of that kind. Runs are read sample by sample, left to right; a run of the
    wrong length or a count of items that does not match the text raises naming the kind.
    """
    order: list[tuple[str, int]] = []
    used = dict.fromkeys(counts, 0)
    for sample in range(input_ids.shape[0]):
        ids = input_ids[sample][attention_mask[sample].bool()].tolist()
        position = 0
        while position < len(ids):
            kind = kinds.get(ids[position])
            if kind is None:
                position += 1
                continue
            index = used.get(kind, 0)
            kind_counts = counts.get(kind, ())
            if index >= len(kind_counts):
                raise ValueError(
                    f"inputs: the text holds more {kind} placeholder runs than the {len(kind_counts)} {kind}(s) given"
                )
            size = kind_counts[index]
            if ids[position : position + size] != [ids[position]] * size:
                raise ValueError(
                    f"inputs: {kind} {index} needs a run of {size} consecutive {kind} placeholder tokens in sample "
                    f"{sample}; pass the processor's unmodified output for the same {kind}s and text"
                )
            order.append((kind, index))
            used[kind] = index + 1
            position += size
    for kind, kind_counts in counts.items():
        if used[kind] != len(kind_counts):
            raise ValueError(
                f"inputs: {len(kind_counts)} {kind}(s) were given but the text holds placeholders for {used[kind]}"
            )
    return order


def placeholder_keep_mask(
    attention_mask: torch.Tensor,
    blocks: Sequence[tuple[int, int, int]],
    new_counts: Sequence[int],
    slots: Sequence[torch.Tensor] | None,
) -> torch.Tensor:
    """(B, L) bool: the positions that survive (real tokens, minus the dropped placeholders)."""
    if len(new_counts) != len(blocks):
        raise ValueError(f"got features for {len(new_counts)} images but the text has {len(blocks)} image runs")
    keep = attention_mask.bool().clone()
    for image, (sample, start, size) in enumerate(blocks):
        kept = slots[image] if slots is not None else torch.arange(new_counts[image])
        if kept.numel() != new_counts[image] or (kept.numel() and not 0 <= int(kept.min()) <= int(kept.max()) < size):
            raise ValueError(f"image {image}: {new_counts[image]} reduced tokens do not fit its {size} placeholders")
        keep_run = torch.zeros(size, dtype=torch.bool, device=keep.device)
        keep_run[kept.to(keep.device)] = True
        keep[sample, start : start + size] = keep_run
    return keep


def compact_and_pad(values: torch.Tensor, keep: torch.Tensor, pad_value: int, side: PaddingSide) -> torch.Tensor:
    """Keep the `keep` positions of each row and pad the rows to a common length on `side`."""
    lengths = keep.sum(dim=1)
    width = int(lengths.max()) if lengths.numel() else 0
    out = values.new_full((values.shape[0], width), pad_value)
    for row in range(values.shape[0]):
        kept = values[row][keep[row]]
        if side == "left":
            out[row, width - kept.numel() :] = kept
        else:
            out[row, : kept.numel()] = kept
    return out
