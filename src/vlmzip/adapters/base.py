"""What every family shares: placeholder shrinking, re-padding, and the per-instance state.

A family adapter says where the tower and projector are, how many placeholders the processor
emitted per image, and how to turn pixels into reduced, projected features. This module turns
that into inputs whose image placeholder runs are `dominant + contextual` long per image, with the
compressed features handed to the model through its own precomputed-features path
(`mm_encoder_outputs`), so the language model never sees the full-length sequence.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmzip.adapters.cached import CachedEncoding
from vlmzip.adapters.encoded import EncodedImages
from vlmzip.adapters.probes import ProbeSourcing
from vlmzip.cache import ImageCache, VisualUnit
from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction, adaptive_dominant, anchor_indices
from vlmzip.images import processor_input_size
from vlmzip.methods import get_method
from vlmzip.probe import ProbeOutput, TowerInfo, check_finite, resolve_tower

PaddingSide = Literal["left", "right"]
# units_inputs() of multi-crop families: crops per image, stated instead of derived from image sizes.
CROP_COUNTS_KEY = "_visionzip_crop_counts"
_APPLIED = object()  # prepare(cache=...) default: the cache given to vlmzip.apply
IGNORE_INDEX = -100  # transformers' label value for positions without loss


def original_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, L) position ids of a prompt as `generate()` numbers it: real tokens 0, 1, ...; padding 0."""
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 0)


class FamilyGeometry:
    """What a family's adapter knows without a budget: where the tower and projector are, the feature layer,
    the placeholder ids, and the token counts per image / crop. Built from a model alone by
    `vlmzip.adapters.geometry_of(model, processor=None)`; `Adapter` adds the budgeted reduction on top.
    """

    families: ClassVar[tuple[str, ...]] = ()  # model class names this family handles
    image_input_keys: ClassVar[tuple[str, ...]] = ("pixel_values",)  # consumed by prepare()
    modality: ClassVar[str] = "image"

    def __init__(self, model: nn.Module, processor: Any = None, feature_layer: int | None = None) -> None:
        self.model = model
        # Where the input geometry comes from: the model's processor, else the directory it was loaded from.
        self.processor_source = processor if processor is not None else model_directory(model)
        self.check_model()
        self.tower_info: TowerInfo = self.resolve_tower_info()
        self.feature_layer = self.resolve_feature_layer(feature_layer)

    @classmethod
    def geometry(cls, model: nn.Module, processor: Any = None) -> FamilyGeometry:
        """This family's geometry of `model`, without a budget: the members of `FamilyGeometry` work on it,
        the reduction needs an adapter (`vlmzip.apply`). See `vlmzip.adapters.geometry_of`."""
        geometry = cls.__new__(cls)
        FamilyGeometry.__init__(geometry, model, processor)
        return geometry

    def check_model(self) -> None:
        """Refuse a model of this family whose configuration the family cannot handle (a ValueError)."""

    @classmethod
    def model_position_ids(cls, model: nn.Module, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """The position-ids hook of a text continuation: the position ids `model` computes itself for these
        processor (or prepared) outputs, where a caller that feeds them piecewise (a multi-turn dialogue)
        must pass them explicitly (M-RoPE); None where the model numbers its tokens 1-D itself."""
        return None

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

    def budget_unit_tokens(self, inputs: Mapping[str, Any]) -> int:
        """The tokens of one budget unit (image / crop / tile) that `dominant + contextual` is a share of.

        By default the tower's tokens for these pixel_values ([CLS] included); families whose language
        model sees pooled or merged tokens (Gemma 3, InternVL) count those instead.
        """
        pixel_values = inputs.get("pixel_values")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.ndim >= 4:
            return self.tower_info.num_tokens(*pixel_values.shape[-2:])
        return self.tokens_per_unit()

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

    @property
    def drops_cls(self) -> bool:
        """Whether the processor's placeholders leave out the tower's [CLS] token (LLaVA's "default" strategy)."""
        return False

    def placeholders_for(self, tower_tokens: int) -> int:
        """Placeholders the processor writes for a unit of `tower_tokens` tower tokens (less a dropped [CLS])."""
        return tower_tokens - (1 if self.drops_cls else 0)

    def placeholder_blocks(
        self, inputs: Mapping[str, Any], input_ids: torch.Tensor, attention_mask: torch.Tensor, full_counts: list[int]
    ) -> list[tuple[int, int, int]]:
        """(sample, start, length) of each image's placeholder run, in image order (see `find_placeholder_blocks`).

        Families whose runs hold layout tokens between the placeholders (Mistral 3's row breaks) override this.
        """
        return find_placeholder_blocks(input_ids, attention_mask, self.placeholder_token_ids, full_counts)

    def resolve_feature_layer(self, layer: int | None) -> int:
        """The tower layer whose output the projector takes: `layer`, else the model config's choice."""
        if layer is None:
            layer = getattr(self.model.config, "vision_feature_layer", -2)
        if not isinstance(layer, int):
            raise ValueError(
                f"vision_feature_layer={layer!r}: VisionZip needs one feature layer; set "
                "VisionZipConfig(feature_layer=...) to choose it"
            )
        self.tower_info.feature_layer_index(layer)  # raises when out of range
        return layer

    def input_size(self) -> tuple[int, int] | None:
        """(height, width) of the images the processor hands the tower, where known."""
        return processor_input_size(self.processor_source)

    def geometry_note(self) -> str:
        """Where tokens_per_unit's count comes from, for error messages."""
        size = self.input_size()
        if size is not None:
            return f"at the processor's {size[0]}x{size[1]} input"
        image_size = getattr(getattr(self.model.config, "vision_config", None), "image_size", None)
        return f"at the tower config's image_size {image_size}" if image_size else "per image"


class Adapter(FamilyGeometry, ProbeSourcing, CachedEncoding):
    """Base class of the per-family adapters: the family's geometry plus a budget (`config`) and the
    reduction it drives; one instance lives on each patched model."""

    # Families with 1-D position ids whose encode() fills `EncodedImages.positions` set this (see position_ids).
    supports_original_positions: ClassVar[bool] = False
    # Families that always keep the unreduced prompt's positions (M-RoPE) and build them in their own prepare().
    keeps_original_positions: ClassVar[bool] = False
    # Families whose encode() reduces through run_method() and takes its per-unit lists (adaptive budgets).
    supports_adaptive: ClassVar[bool] = False

    def __init__(self, model: nn.Module, config: VisionZipConfig, processor: Any = None) -> None:
        self.config = config
        if config.positions == "original" and not (self.supports_original_positions or self.keeps_original_positions):
            raise ValueError(
                f"positions='original' is not supported for {type(model).__name__}; use positions='compact'"
            )
        if config.adaptive and not self.supports_adaptive:
            raise ValueError(
                f"attention_mass (adaptive budget) is not supported for {type(model).__name__}; use a fixed budget"
            )
        super().__init__(model, processor, config.feature_layer)
        self.method = get_method(config.method)
        self.check_budget()
        self.cache: ImageCache | None = None  # set by vlmzip.apply(..., cache=...)

    # --- what each family provides -------------------------------------------------------
    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        raise NotImplementedError

    def visual_units(self, inputs: Mapping[str, Any]) -> list[VisualUnit] | None:
        """Every image / video of `inputs` in text order, as the cache keys it, without running the tower.

        Families that return None are cached per call: one key per item, all items encoded together.
        """
        return None

    def units_inputs(self, units: Sequence[VisualUnit]) -> dict[str, Any]:
        """Inputs for `encode` that hold these items only, in this order (families with `visual_units`)."""
        raise NotImplementedError

    # --- shared ----------------------------------------------------------------------------
    def attach_features(self, prepared: dict[str, Any], encoded: EncodedImages) -> None:
        """Hand the reduced features to the model's precomputed-features path (after shrinking)."""
        prepared["mm_encoder_outputs"] = {
            self.modality: BaseModelOutputWithPooling(pooler_output=list(encoded.features))
        }

    def check_budget(self) -> None:
        available = self.tokens_per_unit()
        placeholders = self.placeholders_for(available)  # a unit never sends more tokens than these
        self.check_adaptive(placeholders)
        if not self.config.adaptive and self.config.tokens > placeholders:
            dropped = " less the [CLS] its feature strategy drops" if placeholders < available else ""
            raise ValueError(
                f"dominant + contextual must be <= {placeholders} (the tokens this model's tower yields per image "
                f"{self.geometry_note()}{dropped}), got {self.config.dominant} + {self.config.contextual} = "
                f"{self.config.tokens}"
            )

    def check_adaptive(self, available: int) -> None:
        """With an adaptive budget: the fewest tokens per unit must fit the `available` tokens of one unit."""
        config = self.config
        if not config.adaptive:
            return
        if config.fewest_tokens > available:
            raise ValueError(
                f"min_dominant + contextual must be <= {available} (the placeholders of one image / crop of this "
                f"model), got {config.min_dominant} + {config.contextual} = {config.fewest_tokens}"
            )

    _method_listener: Callable[[str], None] | None = None

    @contextmanager
    def watching_method(self, listener: Callable[[str], None]) -> Iterator[None]:
        """Inside the context, `listener("start")` and `listener("end")` bracket every call of the reduction
        method (e.g. to time the selection alone); the method itself is left as it is."""
        if not callable(listener):
            raise TypeError(f"listener must be callable, got {type(listener).__name__}")
        previous, self._method_listener = self._method_listener, listener
        try:
            yield
        finally:
            self._method_listener = previous

    def call_method(self, probe: ProbeOutput, config: Any) -> Reduction:
        """`self.method(probe, config)`, announced to the `watching_method` listener when one is active."""
        listener = self._method_listener
        if listener is not None:
            listener("start")
        reduction = self.method(probe, config)
        if listener is not None:
            listener("end")
        return reduction

    def run_method(self, probe: ProbeOutput, config: VisionZipConfig | None = None) -> Reduction | list[Reduction]:
        """Apply the method to every unit (image, crop, frame) of `probe`.

        A fixed budget gives one batched Reduction. An adaptive budget (`config.attention_mass`) gives
        one single-row Reduction per unit: each unit's dominant count is chosen from its scores
        (`core.adaptive_dominant`, at most the unit's placeholders minus `contextual`), and units that chose
        the same count are reduced together.
        """
        config = self.config if config is None else config
        if not config.adaptive:
            return self.call_method(probe, config)
        placeholders = self.placeholders_for(probe.features.shape[1])  # a unit never sends more than these
        if config.fewest_tokens > placeholders:
            raise ValueError(
                f"min_dominant + contextual must be <= {placeholders} (the placeholders of one unit here), "
                f"got {config.fewest_tokens}"
            )
        ceiling = placeholders - config.contextual
        maximum = ceiling if config.max_dominant is None else min(config.max_dominant, ceiling)
        counts = adaptive_dominant(
            probe.scores, config.attention_mass, has_cls=probe.has_cls, minimum=config.min_dominant, maximum=maximum
        ).tolist()
        units: list[Reduction | None] = [None] * len(counts)
        for count in sorted(set(counts)):
            rows = [row for row, value in enumerate(counts) if value == count]
            fixed = config.replace(dominant=count, attention_mass=None, max_dominant=None, min_dominant=1)
            for row, reduction in zip(rows, self.call_method(probe[rows], fixed).split(), strict=True):
                units[row] = reduction
        return [unit for unit in units if unit is not None]

    def reduce(
        self, pixel_values: torch.Tensor, **tower_kwargs: Any
    ) -> tuple[ProbeOutput | None, Reduction | list[Reduction]]:
        """Probe the tower at the feature layer (`probe_tower`) and apply the configured method (see `run_method`).

        Inside `reductions_from(source)` the source answers instead (no probe: the first item is None).
        """
        given = self.reduction_from_source(pixel_values)
        if given is not None:
            return None, given
        probe = self.probe_tower(pixel_values, **tower_kwargs)
        num_tokens = probe.features.shape[1]
        if self.config.fewest_tokens > num_tokens:
            raise ValueError(
                f"dominant + contextual must be <= {num_tokens} (the tokens the tower yields for these "
                f"pixel_values), got {self.config.fewest_tokens}"
            )
        return probe, self.run_method(probe)

    # --- positions -------------------------------------------------------------------------------
    def anchor_rows(self, reductions: Sequence[Reduction]) -> list[torch.Tensor] | None:
        """The anchors (`core.anchor_indices`) of every row of `reductions`, in order, for the `encode()` of a
        family that fills `EncodedImages.positions`; None under `positions="compact"`, which never reads them."""
        if self.config.positions != "original":
            return None
        return [row for reduction in reductions for row in anchor_indices(reduction).unbind(0)]

    def position_ids(
        self, attention_mask: torch.Tensor, blocks: Sequence[tuple[int, int, int]], encoded: EncodedImages
    ) -> torch.Tensor | None:
        """The position-ids hook: (B, L) position ids laid over the *unreduced* input, or None.

        `prepare()` calls it after `encode()` with the unreduced `attention_mask`, every image's
        placeholder run `(sample, start, length)` and the encoded images, then keeps the columns that
        survive the reduction (each image's reduced tokens fill the first slots of its run, or
        `encoded.slots`) and hands the result to the model as `position_ids`, which `generate()`
        carries through the KV cache, beam expansion and decoding (it continues from the last column).

        None (the default, `positions="compact"`) lets the model number the reduced sequence itself.
        For `positions="original"` this base implementation numbers the unreduced prompt as `generate()`
        does (`original_positions`: real tokens 0, 1, ... per sample, padding excluded), so text keeps the
        position it has with all tokens, and gives the reduced tokens of image i, in order, the positions of
        the placeholders `encoded.positions[i]` names (offsets within its run): a kept token its own, a
        contextual token that of the token it was merged onto (`core.anchor_indices`).

        A family with 1-D positions plugs in by setting `supports_original_positions = True` and filling
        `EncodedImages.positions` in its `encode()`, mapping each reduced token's anchor (an index into the
        tower's tokens, e.g. from `anchor_indices`) to the placeholder that token had in the unreduced prompt.
        A family with other positions (M-RoPE) sets `keeps_original_positions` and builds them itself.
        """
        if self.config.positions != "original" or self.keeps_original_positions:
            return None
        if encoded.positions is None or len(encoded.positions) != len(blocks):
            raise RuntimeError(f"{type(self).__name__}.encode did not give the reduced tokens' positions")
        positions = original_positions(attention_mask)
        out = positions.clone()
        for image, (sample, start, size) in enumerate(blocks):
            offsets = encoded.positions[image].to(positions.device)
            if offsets.numel() and not 0 <= int(offsets.min()) <= int(offsets.max()) < size:
                raise RuntimeError(f"image {image}: reduced-token positions fall outside its {size} placeholders")
            first = slots_of(encoded, image, offsets.numel()).to(positions.device) + start
            out[sample, first] = positions[sample, start + offsets]
        return out

    def pad_token_id(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> int:
        config = self.model.config
        for source in (config, getattr(config, "text_config", None), getattr(self.model, "generation_config", None)):
            value = getattr(source, "pad_token_id", None) if source is not None else None
            if isinstance(value, int):
                return value
        padded = input_ids[attention_mask == 0]
        return int(padded[0]) if padded.numel() else 0

    def prepare(
        self, inputs: Mapping[str, Any], padding_side: PaddingSide | None = None, cache: Any = _APPLIED
    ) -> dict[str, Any]:
        """See `vlmzip.prepare`; `cache` overrides the adapter's own cache for this call (None: no cache)."""
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
        for key in self.image_input_keys:
            if isinstance(prepared.get(key), torch.Tensor):
                check_finite(f"inputs[{key!r}]", prepared[key])
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
        encoded = self.encode_visuals(prepared, self.cache if cache is _APPLIED else cache)
        new_counts = [int(f.shape[0]) for f in encoded.features]
        keep = placeholder_keep_mask(attention_mask, blocks, new_counts, encoded.slots)
        position_ids = self.position_ids(attention_mask, blocks, encoded)

        if padding_side is None:
            right_padded = bool((attention_mask[:, -1] == 0).any())
            padding_side = "right" if right_padded else "left"
        pad_values = {"input_ids": self.pad_token_id(input_ids, attention_mask), "labels": IGNORE_INDEX}
        for key, value in list(prepared.items()):
            if isinstance(value, torch.Tensor) and value.shape == input_ids.shape and key != "attention_mask":
                prepared[key] = compact_and_pad(value, keep, pad_values.get(key, 0), padding_side)
        prepared["attention_mask"] = compact_and_pad(torch.ones_like(attention_mask), keep, 0, padding_side)
        if position_ids is not None:
            prepared["position_ids"] = compact_and_pad(position_ids, keep, 0, padding_side)
        for key in self.image_input_keys:
            prepared.pop(key, None)
        self.attach_features(prepared, encoded)
        self.last_encoded = encoded
        return prepared


def check_square_batch(pixel_values: object, side: int, items: str) -> torch.Tensor:
    """`inputs['pixel_values']` as an (items, channels, side, side) tensor, or a ValueError naming the shape."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4 or pixel_values.shape[-2:] != (side, side):
        raise ValueError(
            f"inputs['pixel_values'] must be an ({items}, channels, {side}, {side}) tensor as the processor returns "
            f"it, got {getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
        )
    return pixel_values


def model_directory(model: nn.Module) -> Path | None:
    """The local directory `model` was loaded from (`name_or_path`), if it is one."""
    sources = (getattr(model, "name_or_path", None), getattr(getattr(model, "config", None), "_name_or_path", None))
    for source in sources:
        if isinstance(source, (str, Path)) and str(source) and Path(source).is_dir():
            return Path(source)
    return None


def reduction_list(reduced: Reduction | list[Reduction]) -> list[Reduction]:
    """`run_method`'s result as a list: the one batched Reduction of a fixed budget, or the per-unit ones."""
    return [reduced] if isinstance(reduced, Reduction) else list(reduced)


def slots_of(encoded: EncodedImages, image: int, count: int) -> torch.Tensor:
    """The placeholders (within its run) that image `image`'s `count` reduced tokens occupy, in token order."""
    if encoded.slots is not None:
        return encoded.slots[image]
    return torch.arange(count)


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
