"""Mistral 3 end to end on a tiny random Mistral3ForConditionalGeneration (Pixtral 8 px patches, 2x2 merger)."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from families import (
    MISTRAL_BREAK_TOKEN_ID,
    MISTRAL_END_TOKEN_ID,
    MISTRAL_IMAGE_TOKEN_ID,
    MISTRAL_MERGE,
    make_mistral3,
    make_mistral3_processor,
)
from helpers import (
    FamilyChecks,
    assert_apply_refused,
    assert_full_budget_gives_the_models_own_features,
    family_fixtures,
    images_of_sizes,
    mixed_images,
    mixed_prompts,
    visual_tokens_reaching_llm,
)
from reference import reference_received_attention, reference_units, reference_visionzip
from test_conversation import run_two_image_dialogue
from vlmzip.adapters.mistral3 import merge_units
from vlmzip.methods import available_methods

DOMINANT, CONTEXTUAL = 5, 2
BUDGET = DOMINANT + CONTEXTUAL
# (height, width) -> merged grid: resized to <= 128 px, multiples of 16 px.
SIZES_AND_GRIDS = [((300, 400), (6, 8)), ((100, 60), (7, 4)), ((40, 90), (3, 6))]
PROMPTS = mixed_prompts("[IMG]")
processor, images, model = family_fixtures(
    make_mistral3, make_mistral3_processor, lambda: images_of_sizes(size for size, _ in SIZES_AND_GRIDS)
)


def batch(processor, images):
    """An image, a text-only row, two images of different sizes in one prompt (pixel_values padded)."""
    return processor(text=PROMPTS, images=images[:3], return_tensors="pt", padding=True)


def singles(processor, images):
    samples = zip(PROMPTS, mixed_images(images), strict=True)
    return [processor(text=[prompt], images=sample or None, return_tensors="pt") for prompt, sample in samples]


# --- a literal reference ---------------------------------------------------------------------------
def reference_image(model, pixel_values, size, dominant, contextual):
    """VisionZip on one image with plain loops: Pixtral's feature layer with its 2-D rotary, merged units."""
    tower = model.model.vision_tower
    height, width = size
    patch = tower.config.patch_size
    rows, cols = height // patch, width // patch
    heads = tower.config.num_attention_heads
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values[None], torch.tensor([size])).pooler_output[0]
        hidden = tower(pixel_values[None, :, :height, :width], output_hidden_states=True).hidden_states
        layer = tower.transformer.layers[-1]
        normed = layer.attention_norm(hidden[-2])
        queries = layer.attention.q_proj(normed)[0].view(rows * cols, heads, -1).transpose(0, 1)
        keys = layer.attention.k_proj(normed)[0].view(rows * cols, heads, -1).transpose(0, 1)
        positions = torch.tensor([[row, col] for row in range(rows) for col in range(cols)])
        cos, sin = tower.patch_positional_embedding(normed, positions)
        rotary = __import__(type(layer.attention).__module__, fromlist=["apply_rotary_pos_emb"])
        rotated_queries, rotated_keys = rotary.apply_rotary_pos_emb(queries, keys, cos, sin, unsqueeze_dim=0)
    received = reference_received_attention(rotated_queries, rotated_keys)
    unit_scores, unit_keys = reference_units(received, keys.mean(dim=0), rows, cols, MISTRAL_MERGE)
    return reference_visionzip(features, unit_scores, unit_keys, dominant, contextual)


def test_reduced_images_equal_a_literal_reference(model, processor, images):
    inputs = batch(processor, images)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    with torch.no_grad():
        reduced = vlmzip.prepare(model, inputs)["mm_encoder_outputs"]["image"].pooler_output
    assert len(reduced) == 3
    for pixels, size, tokens in zip(inputs["pixel_values"], inputs["image_sizes"].tolist(), reduced, strict=True):
        expected = reference_image(model, pixels, size, DOMINANT, CONTEXTUAL)
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


def test_merge_units_follow_the_patch_merger():
    units = merge_units(4, 6, 2)
    assert units.tolist()[:3] == [[0, 1, 6, 7], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert units.tolist()[3] == [12, 13, 18, 19]


def test_full_budget_gives_the_models_own_features(model, processor, images):
    inputs = processor(text=[PROMPTS[2]], images=[images[0], images[0]], return_tensors="pt")
    assert_full_budget_gives_the_models_own_features(model, inputs, 48, ["pixel_values", "image_sizes"])


# --- what reaches the language model ---------------------------------------------------------------
def test_every_image_sends_the_budget_then_one_img_end(model, processor, images):
    inputs = batch(processor, images)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    image_counts = [1, 0, 2]
    for row in range(3):
        original = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
        reduced = prepared["input_ids"][row][prepared["attention_mask"][row].bool()].tolist()
        assert MISTRAL_BREAK_TOKEN_ID not in reduced
        assert reduced.count(MISTRAL_END_TOKEN_ID) == original.count(MISTRAL_END_TOKEN_ID) == image_counts[row]
        for end in [i for i, token in enumerate(reduced) if token == MISTRAL_END_TOKEN_ID]:
            assert reduced[end - BUDGET : end] == [MISTRAL_IMAGE_TOKEN_ID] * BUDGET
            assert reduced[end - BUDGET - 1] != MISTRAL_IMAGE_TOKEN_ID
        layout = (MISTRAL_IMAGE_TOKEN_ID, MISTRAL_BREAK_TOKEN_ID)
        assert [t for t in original if t not in layout] == [t for t in reduced if t != MISTRAL_IMAGE_TOKEN_ID]
    assert visual_tokens_reaching_llm(model, prepared, MISTRAL_IMAGE_TOKEN_ID).shape[0] == 3 * BUDGET


class TestFamilyChecks(FamilyChecks):
    make_model = staticmethod(make_mistral3)
    dominant, contextual = DOMINANT, CONTEXTUAL
    batch, singles = staticmethod(batch), staticmethod(singles)


def test_conversation_answers_equal_fresh_runs(processor, images):
    model = make_mistral3(seed=1)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    chat = run_two_image_dialogue(model, processor, images, model.model.vision_tower, "[IMG]")
    assert chat.input_ids[0].tolist().count(MISTRAL_IMAGE_TOKEN_ID) == 2 * BUDGET


@pytest.mark.parametrize("method", [m for m in available_methods() if m != "visionzip"])
def test_other_methods_same_budget(model, processor, images, method):
    vlmzip.apply(model, dominant=3, contextual=1, method=method)  # 4 tokens: pool makes a 2x2 grid
    prepared = vlmzip.prepare(model, batch(processor, images))
    assert int((prepared["input_ids"] == MISTRAL_IMAGE_TOKEN_ID).sum()) == 3 * 4
    with torch.no_grad():
        model(**prepared)


# --- impossible budgets ---------------------------------------------------------------------------
def test_budget_over_the_largest_image_is_refused_at_apply(model):
    assert_apply_refused(model, ValueError, "<= 64 .*128 px square.* 60 \\+ 5 = 65", dominant=60, contextual=5)
    assert_apply_refused(model, ValueError, "feature_layer must be in \\[-3, -1\\]", feature_layer=0)


def test_budget_over_a_small_image_is_refused_at_prepare(model, processor, images):
    vlmzip.apply(model, dominant=15, contextual=4)
    with pytest.raises(ValueError, match="<= 18 for image 2 \\(its 3x6 merged tokens at 48x96 px\\)"):
        vlmzip.prepare(model, batch(processor, images))


def test_bad_inputs(model, processor, images):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    inputs = dict(batch(processor, images))
    broken = inputs["input_ids"].clone()
    broken[broken == MISTRAL_BREAK_TOKEN_ID] = MISTRAL_IMAGE_TOKEN_ID
    with pytest.raises(ValueError, match=r"\[IMG\] tokens"):
        vlmzip.prepare(model, {**inputs, "input_ids": broken})
    with pytest.raises(ValueError, match="image_sizes"):
        vlmzip.prepare(model, {**inputs, "image_sizes": inputs["image_sizes"][:2]})
    with pytest.raises(ValueError, match="image_sizes"):
        vlmzip.prepare(model, {**inputs, "image_sizes": inputs["image_sizes"] * 4})
    with pytest.raises(ValueError, match="pixel_values"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][0]})


def test_several_feature_layers_are_refused(model):
    model.config.vision_feature_layer = [-1, -2]
    assert_apply_refused(model, ValueError, "one feature layer")
    model.config.vision_feature_layer = -1
