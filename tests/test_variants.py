"""The shared "which variant to run" module: one-budget variants, own splits, unit tokens and dtypes."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llava, make_llava_processor, random_images
from vlmzip.cli_options import DTYPE_NAMES, dtype_named
from vlmzip.measure import timed
from vlmzip.variants import FULL, Variant, single_variant, unit_tokens


def test_single_variant_defaults_and_splits():
    default = single_variant()
    assert (default.method, default.budget, default.contextual) == ("visionzip", 64, 10)
    assert (default.config().dominant, default.config().contextual) == (54, 10)
    own = single_variant("pool", dominant=30, contextual=2)
    assert (own.config().dominant, own.config().contextual, own.config().method) == (30, 2, "pool")
    paper = single_variant("visionzip", tokens=128)
    assert (paper.config().dominant, paper.config().contextual, paper.contextual) == (108, 20, None)
    assert single_variant(FULL).is_full and not single_variant(FULL).inside_llm
    assert single_variant("fastv", tokens=64).inside_llm
    assert Variant("visionzip", 64, contextual=0).config().dominant == 64


def test_single_variant_refusals():
    with pytest.raises(ValueError, match="method must be one of"):
        single_variant("nope")
    with pytest.raises(ValueError, match="not both"):
        single_variant(tokens=64, dominant=54)
    with pytest.raises(ValueError, match="dominant must be"):
        single_variant(dominant=0)
    with pytest.raises(ValueError, match="contextual must be"):
        single_variant(contextual=-1)
    with pytest.raises(ValueError, match="dominant must be"):
        Variant("visionzip", 4, contextual=4).config()  # no dominant token left
    with pytest.raises(TypeError, match="tokens must be"):
        single_variant(tokens=6.5)


def test_unit_tokens_with_and_without_inputs():
    model, processor = make_llava(), make_llava_processor()
    inputs = processor(images=random_images(1), text=["<image> q"], return_tensors="pt")
    side = inputs["pixel_values"].shape[-1] // model.config.vision_config.patch_size
    assert unit_tokens(model, inputs) == unit_tokens(model, processor=processor) == 1 + side * side


def test_dtype_names():
    assert [dtype_named(name) for name in DTYPE_NAMES] == [torch.float32, torch.bfloat16, torch.float16]
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, got 'int8'"):
        dtype_named("int8", "dtype")


def test_timed():
    result, milliseconds = timed(lambda: sum(range(1000)))
    assert result == 499500 and milliseconds >= 0
