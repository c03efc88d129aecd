"""The image cache's side of an adapter: look items up before encoding, encode only the misses.

`Adapter` inherits this mixin; it relies on the adapter's `model`, `config`, `vision_tower()`,
`full_counts()`, `placeholder_token_ids`, `image_token_id`, `encode()` and, for families that
describe their items one by one, `visual_units()` / `units_inputs()`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlmzip.adapters.encoded import EncodedImages
from vlmzip.cache import CachedVisual, ImageCache, VisualUnit, hash_tensors
from vlmzip.core import Reduction

# Per-token text inputs: they never change an image's tokens.
TEXT_INPUT_KEYS = ("input_ids", "attention_mask", "labels", "token_type_ids", "mm_token_type_ids", "position_ids")


class CachedEncoding:
    """`encode_visuals`: `encode()` with items found in an `ImageCache` taken from it."""

    def cache_context(self, cache: ImageCache) -> dict[str, Any]:
        """Everything besides an item's own pixels and layout that changes its reduced tokens."""
        tower_dtype = next(self.vision_tower().parameters()).dtype
        return {
            "model": cache.model_key(self.model),
            "adapter": type(self).__qualname__,
            "config": self.config.to_dict(),
            "feature_layer": self.feature_layer,
            "dtype": str(tower_dtype),
        }

    def text_width(self) -> int:
        config = self.model.config
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        return int(text_config.hidden_size)

    def whole_call_units(self, inputs: Mapping[str, Any]) -> list[VisualUnit]:
        """Fallback units: item i of this exact set of visual inputs (families without `visual_units`)."""
        full_counts = self.full_counts(inputs)
        digest = hashlib.blake2b(digest_size=20)
        text_shape = inputs["input_ids"].shape
        tensors = [
            value
            for key, value in sorted(inputs.items())
            if isinstance(value, torch.Tensor) and key not in TEXT_INPUT_KEYS and value.shape != text_shape
        ]
        hash_tensors(digest, tensors)
        # Other plain values are generation settings (max_new_tokens, ...) when generate() prepares
        # itself: they do not change the visual tokens, except the adapter's own stated layouts.
        other = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor) and k.startswith("_visionzip")}
        digest.update(repr(sorted(other.items(), key=lambda item: item[0])).encode())
        input_ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        mask = torch.ones_like(input_ids, dtype=torch.bool) if mask is None else mask.bool()
        ids = torch.tensor(self.placeholder_token_ids, device=input_ids.device)
        hash_tensors(digest, [input_ids[mask & torch.isin(input_ids, ids)]])  # the order of the kinds
        call = digest.hexdigest()
        return [
            VisualUnit("item", (), (call, index), count, self.image_token_id) for index, count in enumerate(full_counts)
        ]

    def join_encoded(self, visuals: Sequence[CachedVisual], reductions: list[Reduction]) -> EncodedImages:
        """EncodedImages of cached and fresh items (text order); families with extra fields override this."""
        slots = None
        if any(visual.slots is not None for visual in visuals):
            slots = [
                visual.slots if visual.slots is not None else torch.arange(visual.features.shape[0])
                for visual in visuals
            ]
        return EncodedImages(
            features=[visual.features for visual in visuals],
            full_counts=[visual.full_count for visual in visuals],
            slots=slots,
            reductions=reductions,
            positions=cached_positions(visuals),
        )

    def encode_visuals(self, inputs: Mapping[str, Any], cache: ImageCache | None) -> EncodedImages:
        """`encode(inputs)`, with items found in `cache` taken from it and only the others encoded."""
        if cache is None:
            return self.encode(inputs)
        units = self.visual_units(inputs)
        per_item = units is not None
        if units is None:
            units = self.whole_call_units(inputs)
        context = self.cache_context(cache)
        keys = [cache.key(context, unit) for unit in units]
        device = next(self.vision_tower().parameters()).device
        known: dict[str, CachedVisual | None] = {}  # an item repeated within the call is looked up once
        for unit, key in zip(units, keys, strict=True):
            if key not in known:
                entry = cache.get(key)
                if entry is not None and not self._fits(entry, unit):
                    entry = None  # never trust an entry that does not fit the item (e.g. an edited file)
                known[key] = entry.to(device) if entry is not None else None
        missing = [index for index, key in enumerate(keys) if known[key] is None and keys.index(key) == index]
        reductions: list[Reduction] = []
        if missing:
            encoded = self.encode(self.units_inputs([units[i] for i in missing]) if per_item else inputs)
            fresh = list(range(len(units))) if not per_item else missing
            if len(encoded.features) != len(fresh):
                raise RuntimeError(f"{type(self).__name__} encoded {len(encoded.features)} items, not {len(fresh)}")
            for position, index in enumerate(fresh):
                slots = encoded.slots[position] if encoded.slots is not None else None
                original = encoded.positions is not None and self.config.positions == "original"
                positions = encoded.positions[position] if original else None  # only read for "original"
                visual = CachedVisual(
                    self.cached_features(encoded, position),
                    encoded.full_counts[position],
                    slots,
                    units[index].modality,
                    positions,
                )
                if known[keys[index]] is None:
                    cache.put(keys[index], visual)
                if not per_item or index in missing:
                    known[keys[index]] = visual
            reductions = encoded.reductions
        found = [known[key] for key in keys]
        return self.join_encoded(found, reductions)  # type: ignore[arg-type]

    def _fits(self, entry: CachedVisual, unit: VisualUnit) -> bool:
        return (
            entry.is_consistent()
            and entry.full_count == unit.full_count
            and entry.modality == unit.modality
            and entry.features.shape[1] == self.cached_width()
        )

    def cached_features(self, encoded: EncodedImages, entry: int) -> torch.Tensor:
        """What the cache stores for `encoded`'s item `entry`; `join_encoded` undoes it (families with extra fields)."""
        return encoded.features[entry]

    def cached_width(self) -> int:
        """Channels of a cached item's features (`cached_features`)."""
        return self.text_width()


def cached_positions(visuals: Sequence[CachedVisual]) -> list[torch.Tensor] | None:
    """`EncodedImages.positions` of cached items: None unless every item has its positions."""
    positions = [visual.positions for visual in visuals]
    return None if any(p is None for p in positions) else positions  # type: ignore[return-value]


def units_input_ids(units: Sequence[VisualUnit]) -> torch.Tensor:
    """(1, length) input_ids holding only the placeholder runs of `units`, in order (for `units_inputs`)."""
    ids = [unit.token_id for unit in units for _ in range(unit.full_count)]
    return torch.tensor([ids], dtype=torch.long)
