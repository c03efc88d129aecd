"""The reduced-feature cache on its own: rows stored and served back, and the adapter's reduction swapped reversibly."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import make_llava
from vlmzip.api import get_state
from vlmzip.core import Reduction
from vlmzip.finetune.cache import ReducedFeatureCache, reducing_from_cache


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
        probe, served = cache.reduce(stand_in)
    assert probe is None
    assert torch.equal(served.features[0], reduction(2, 100.0).features[1])
    assert torch.equal(served.features[1], reduction(2, 0.0).features[0])
    with pytest.raises(RuntimeError, match="not told about"):
        cache.reduce(stand_in)  # outside serving()


def test_the_adapter_reduces_from_the_cache_only_inside_the_block():
    model = make_llava()
    vlmzip.apply(model, dominant=8, contextual=2)
    adapter = get_state(model).adapter
    cache = ReducedFeatureCache()
    assert "reduce" not in vars(adapter)
    with reducing_from_cache(adapter, cache):
        assert adapter.reduce == cache.reduce
    assert "reduce" not in vars(adapter) and adapter.reduce != cache.reduce
    with pytest.raises(KeyError), reducing_from_cache(adapter, cache):
        raise KeyError("an error inside the block")
    assert "reduce" not in vars(adapter)
    vlmzip.remove(model)
