"""The reduced-feature cache on its own: rows stored and served back, and the adapter's reduction swapped reversibly."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import make_llava, make_llava_processor, random_images
from vlmzip.api import get_state
from vlmzip.core import Reduction
from vlmzip.finetune.cache import ReducedFeatureCache


def reduction(batch: int, offset: float) -> Reduction:
    return Reduction(
        features=torch.arange(batch * 3 * 2, dtype=torch.float32).view(batch, 3, 2) + offset,
        kept_indices=torch.arange(batch * 2).view(batch, 2),
        groups=torch.zeros(batch, 4, dtype=torch.long),
        scores=None,
    )


def test_rows_come_back_in_the_order_asked():
    cache = ReducedFeatureCache()
    pixels = torch.zeros(2, 3, 8, 8)
    assert cache.add(reduction(2, 0.0), pixels) == [0, 1]
    assert cache.add(reduction(2, 100.0), pixels) == [2, 3]
    stand_in = cache.stand_in_pixels([3, 0])
    assert stand_in.shape == (2, 3, 8, 8)
    with cache.serving([3, 0]):
        served = cache.reduction_for(stand_in)
    assert torch.equal(served.features[0], reduction(2, 100.0).features[1])
    assert torch.equal(served.features[1], reduction(2, 0.0).features[0])
    with pytest.raises(RuntimeError, match="not told about"):
        cache.reduction_for(stand_in)  # outside serving()


def test_the_adapter_reduces_from_the_cache_only_inside_the_block():
    """finetune serves cached reductions through the library's reductions_from seam: no method is reassigned."""
    model, processor = make_llava(), make_llava_processor()
    vlmzip.apply(model, dominant=8, contextual=2)
    adapter = get_state(model).adapter
    pixels = processor(images=random_images(2), text=["<image>"] * 2, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        _, fresh = adapter.reduce(pixels)
    cache = ReducedFeatureCache()
    keys = cache.add(fresh, pixels)
    calls = []
    hook = model.model.vision_tower.register_forward_hook(lambda *args: calls.append(1))
    with adapter.reductions_from(cache.reduction_for), cache.serving(keys[::-1]):
        probe, served = adapter.reduce(cache.stand_in_pixels(keys[::-1]))
    hook.remove()
    assert probe is None and not calls and "reduce" not in vars(adapter)
    assert torch.equal(served.features, fresh.features.flip(0))
    assert torch.equal(served.kept_indices, fresh.kept_indices.flip(0))
    with torch.no_grad():
        assert adapter.reduce(pixels)[0] is not None  # outside the block the tower runs again
    with pytest.raises(KeyError), adapter.reductions_from(cache.reduction_for):
        raise KeyError("an error inside the block")
    assert adapter._reduction_source is None
    with adapter.reductions_from(cache.reduction_for), pytest.raises(ValueError, match="already active"):
        with adapter.reductions_from(cache.reduction_for):
            pass
    with pytest.raises(TypeError, match="callable"), adapter.reductions_from("not a function"):
        pass
    vlmzip.remove(model)
