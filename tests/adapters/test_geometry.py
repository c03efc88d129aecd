"""A family's geometry without a budget (`geometry_of`), and the position-ids hook of text continuations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import vlmzip
from conftest import make_llava, make_llava_processor, make_qwen2_vl, make_qwen_processor, qwen_prompt, random_images
from families import make_llava_next
from helpers import BUILDERS
from vlmzip.adapters import FamilyGeometry, adapter_class_for, geometry_of
from vlmzip.adapters.base import Adapter

# The families the geometry checks run on.
FAMILIES = {
    name: BUILDERS[name]
    for name in (
        "llava-1.5",
        "llava-next",
        "llava-onevision",
        "qwen2-vl",
        "qwen3-vl",
        "gemma3",
        "internvl",
        "smolvlm",
        "mistral3",
    )
}


def outcome(function):
    """What `function()` returns, or the type of what it raises."""
    try:
        return function()
    except Exception as error:  # noqa: BLE001 - compared, not swallowed
        return type(error)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_geometry_equals_the_budgeted_adapters(family):
    make_model, make_processor = FAMILIES[family]
    model, processor = make_model(), make_processor()
    geometry = geometry_of(model, processor)
    assert isinstance(geometry, FamilyGeometry)
    assert not hasattr(geometry, "config")  # no budget anywhere
    adapter = adapter_class_for(model)(model, vlmzip.VisionZipConfig(dominant=2, contextual=1), processor)
    assert isinstance(adapter, FamilyGeometry)
    assert geometry.vision_tower() is adapter.vision_tower()
    if hasattr(adapter, "projector"):  # families whose projector is a module of its own (not Qwen's merger)
        assert geometry.projector() is adapter.projector()
    assert geometry.feature_layer == adapter.feature_layer
    assert outcome(geometry.tokens_per_unit) == outcome(adapter.tokens_per_unit)  # Qwen: no fixed count
    assert geometry.placeholder_token_ids == adapter.placeholder_token_ids
    assert geometry.drops_cls == adapter.drops_cls
    assert geometry.token_pixels == adapter.token_pixels
    assert geometry.tower_info.layers is adapter.tower_info.layers


def test_llava_geometry_counts_and_cls():
    processor = make_llava_processor()
    inputs = processor(images=random_images(2), text=["<image> a", "<image> b"], return_tensors="pt", padding=True)
    for strategy, drops in (("default", True), ("full", False)):
        geometry = geometry_of(make_llava(strategy), make_llava_processor(strategy))
        assert geometry.drops_cls is drops
        tower_tokens = geometry.budget_unit_tokens(inputs)
        assert tower_tokens == geometry.tokens_per_unit()
        assert geometry.full_counts(inputs) == [tower_tokens - drops] * 2


def test_geometry_refuses_what_the_adapter_refuses():
    with pytest.raises(ValueError, match="unsupported model family"):
        geometry_of(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model must be"):
        geometry_of("llava")
    model = make_llava_next()
    model.config.vision_feature_select_strategy = "full"
    with pytest.raises(ValueError, match="vision_feature_select_strategy"):
        geometry_of(model)


def test_geometry_needs_no_budget_that_fits():
    """A budget the model cannot hold fails the adapter, never the geometry."""
    model, processor = make_llava(), make_llava_processor()
    geometry = geometry_of(model, processor)
    too_many = geometry.tokens_per_unit() + 1
    with pytest.raises(ValueError, match="dominant \\+ contextual must be <="):
        adapter_class_for(model)(model, vlmzip.VisionZipConfig(dominant=too_many, contextual=0), processor)


def test_position_ids_hook():
    """Text continuations get the model's own positions where it computes them (M-RoPE), else None."""
    qwen, processor = make_qwen2_vl(), make_qwen_processor()
    inputs = processor(images=random_images(1), text=[qwen_prompt("<image>")], return_tensors="pt")
    positions = adapter_class_for(qwen).model_position_ids(qwen, inputs)
    expected, _ = qwen.model.get_rope_index(
        inputs["input_ids"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
    )
    assert torch.equal(positions, expected)
    llava = make_llava()
    assert adapter_class_for(llava).model_position_ids(llava, {"input_ids": torch.ones(1, 3).long()}) is None
    assert Adapter.model_position_ids(llava, {}) is None
