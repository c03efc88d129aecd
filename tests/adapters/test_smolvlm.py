"""SmolVLM end to end on a tiny random SmolVLMForConditionalGeneration (64 px tiles, 8 px patches, shuffle 2)."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import random_images
from families import (
    SMOL_IMAGE_TOKEN_ID,
    SMOL_SCALE,
    SMOL_TILE_TOKENS,
    make_smolvlm,
    make_smolvlm_processor,
)
from helpers import (
    FamilyChecks,
    assert_apply_refused,
    assert_full_budget_gives_the_models_own_features,
    family_fixtures,
    images_of_sizes,
    mixed_images,
    mixed_prompts,
    run_lengths,
    visual_tokens_reaching_llm,
)
from reference import reference_received_attention, reference_units, reference_visionzip
from test_conversation import run_two_image_dialogue
from vlmzip.methods import available_methods

DOMINANT, CONTEXTUAL = 5, 2
# (height, width) -> tiles (global image included): 2 x 2 grid + global, 1 x 2 grid + global.
SIZES_AND_TILES = [((300, 400), 5), ((100, 400), 3), ((400, 300), 5)]
PROMPTS = mixed_prompts()
processor, images, model = family_fixtures(
    make_smolvlm, make_smolvlm_processor, lambda: images_of_sizes(size for size, _ in SIZES_AND_TILES)
)


def batch(processor, images):
    """An image, a text-only row, two images of different tile counts in one prompt."""
    return processor(text=PROMPTS, images=mixed_images(images), return_tensors="pt", padding=True)


def singles(processor, images):
    samples = zip(PROMPTS, mixed_images(images), strict=True)
    return [
        processor(text=[prompt], images=[sample] if sample else None, return_tensors="pt") for prompt, sample in samples
    ]


def runs(input_ids):
    """Lengths of the placeholder runs of one row."""
    return run_lengths(input_ids, SMOL_IMAGE_TOKEN_ID)


# --- a literal reference ---------------------------------------------------------------------------
def reference_tile(model, tile, dominant, contextual):
    """VisionZip on one tile with plain loops: SigLIP's last layer, pixel-shuffle units, target + mean."""
    tower = model.model.vision_model
    heads = tower.config.num_attention_heads
    with torch.no_grad():
        hidden = tower(pixel_values=tile[None], output_hidden_states=True).hidden_states
        features = model.model.connector(tower.post_layernorm(hidden[-1]))[0]  # what the model projects
        layer = tower.encoder.layers[-1]
        normed = layer.layer_norm1(hidden[-2][0])
        queries = layer.self_attn.q_proj(normed)
        keys = layer.self_attn.k_proj(normed)
    patches = keys.shape[0]
    queries, keys = (t.view(patches, heads, -1).transpose(0, 1) for t in (queries, keys))  # (heads, patches, d)
    received = reference_received_attention(queries, keys)
    side = int(patches**0.5)
    unit_scores, unit_keys = reference_units(received, keys.mean(dim=0), side, side, SMOL_SCALE)
    return reference_visionzip(features, unit_scores, unit_keys, dominant, contextual)


def test_reduced_tiles_equal_a_literal_reference(model, processor, images):
    inputs = processor(text=[PROMPTS[2]], images=[[images[1], images[2]]], return_tensors="pt")
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    with torch.no_grad():
        reduced = vlmzip.prepare(model, inputs)["mm_encoder_outputs"]["image"].pooler_output
    tiles = inputs["pixel_values"][0]
    assert len(reduced) == tiles.shape[0] == 3 + 5
    for tile, tokens in zip(tiles, reduced, strict=True):
        expected = reference_tile(model, tile, DOMINANT, CONTEXTUAL)
        torch.testing.assert_close(tokens, expected, atol=1e-5, rtol=1e-5)


def test_full_budget_gives_the_models_own_features(model, processor, images):
    inputs = batch(processor, images)
    assert_full_budget_gives_the_models_own_features(
        model, inputs, SMOL_TILE_TOKENS, ["pixel_values", "pixel_attention_mask"]
    )


# --- what reaches the language model ---------------------------------------------------------------
def test_every_tile_sends_the_budget_and_layout_tokens_stay(model, processor, images):
    inputs = batch(processor, images)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    budget = DOMINANT + CONTEXTUAL
    expected_runs = [[budget] * 5, [], [budget] * (3 + 5)]
    for row in range(3):
        original = inputs["input_ids"][row][inputs["attention_mask"][row].bool()]
        reduced = prepared["input_ids"][row][prepared["attention_mask"][row].bool()]
        assert runs(original) == [SMOL_TILE_TOKENS] * len(expected_runs[row])
        assert runs(reduced) == expected_runs[row]
        # Every layout token (<fake_token_around_image>, <row_r_col_c>, <global-img>) and all text stays.
        assert original[original != SMOL_IMAGE_TOKEN_ID].tolist() == reduced[reduced != SMOL_IMAGE_TOKEN_ID].tolist()
    embeds = visual_tokens_reaching_llm(model, prepared, SMOL_IMAGE_TOKEN_ID)
    assert embeds.shape[0] == budget * 13


def test_per_image_budget_splits_over_the_tiles(model, processor, images):
    inputs = batch(processor, images)
    vlmzip.apply(model, dominant=10, contextual=6, budget_scope="per_image")
    prepared = vlmzip.prepare(model, inputs)
    five, three = 10 // 5 + 6 // 5, 10 // 3 + 6 // 3  # 3 per tile of a 5-tile image, 5 per tile of a 3-tile one
    assert runs(prepared["input_ids"][0]) == [five] * 5
    assert runs(prepared["input_ids"][2]) == [three] * 3 + [five] * 5
    assert sum(runs(prepared["input_ids"][2])) <= 2 * 16


def test_images_without_splitting_are_one_tile(model, images):
    processor = make_smolvlm_processor(do_image_splitting=False)
    inputs = processor(text=[PROMPTS[2]], images=[[images[0], images[1]]], return_tensors="pt")
    vlmzip.apply(model, dominant=6, contextual=2, budget_scope="per_image")
    prepared = vlmzip.prepare(model, inputs)
    assert runs(inputs["input_ids"][0]) == [SMOL_TILE_TOKENS] * 2
    assert runs(prepared["input_ids"][0]) == [8, 8]


class TestFamilyChecks(FamilyChecks):
    make_model = staticmethod(make_smolvlm)
    dominant, contextual = DOMINANT, CONTEXTUAL
    batch, singles = staticmethod(batch), staticmethod(singles)


def test_sampling_with_a_seed_repeats(model, processor, images):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    inputs = batch(processor, images)
    outputs = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad():
            outputs.append(model.generate(**inputs, max_new_tokens=5, do_sample=True, top_k=5, pad_token_id=0))
    assert torch.equal(outputs[0], outputs[1])


def test_conversation_answers_equal_fresh_runs(processor, images):
    model = make_smolvlm(seed=1)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    chat = run_two_image_dialogue(model, processor, images, model.model.vision_model)
    assert runs(chat.input_ids[0]) == [DOMINANT + CONTEXTUAL] * (5 + 3)


@pytest.mark.parametrize("method", [m for m in available_methods() if m != "visionzip"])
def test_other_methods_same_budget(model, processor, images, method):
    vlmzip.apply(model, dominant=3, contextual=1, method=method)  # 4 tokens: pool makes a 2x2 grid of the 4x4
    prepared = vlmzip.prepare(model, batch(processor, images))
    assert runs(prepared["input_ids"][2]) == [4] * 8
    with torch.no_grad():
        model(**prepared)


# --- impossible budgets ---------------------------------------------------------------------------
def test_budget_over_a_tile_is_refused_at_apply(model):
    assert_apply_refused(
        model, ValueError, f"<= {SMOL_TILE_TOKENS} .*SmolVLM tile.* 15 \\+ 2 = 17", dominant=15, contextual=2
    )
    assert_apply_refused(
        model, ValueError, f"<= {SMOL_TILE_TOKENS}", dominant=15, contextual=2, budget_scope="per_image"
    )
    assert_apply_refused(model, ValueError, "feature_layer must be in \\[-3, -1\\]", feature_layer=-4)


def test_per_image_budget_below_the_tile_count_is_refused_at_prepare(model, processor, images):
    vlmzip.apply(model, dominant=4, contextual=0, budget_scope="per_image")
    with pytest.raises(ValueError, match="dominant must be >= the number of crops / frames \\(5\\)"):
        vlmzip.prepare(model, batch(processor, images))


def test_bad_inputs(model, processor, images):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    inputs = dict(batch(processor, images))
    with pytest.raises(ValueError, match="pixel_values"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][0]})
    fewer = inputs["input_ids"].clone()
    fewer[0, fewer[0].tolist().index(SMOL_IMAGE_TOKEN_ID)] = 9
    with pytest.raises(ValueError, match="placeholder"):
        vlmzip.prepare(model, {**inputs, "input_ids": fewer})
    masked = inputs["pixel_attention_mask"].clone()
    masked[0, 0, -8:] = 0
    with pytest.raises(ValueError, match="padded patches"):
        vlmzip.prepare(model, {**inputs, "pixel_attention_mask": masked})


def video_inputs(processor, frames):
    """A video prompt as SmolVLM's processor writes it (its video processor needs torchvision): every frame a
    global image after its timestamp, the frames resized to one tile each."""
    from transformers.models.smolvlm.processing_smolvlm import FRAME_TIMESTAMP_MESSAGE, _prompt_single_image

    text = "USER: frames :"
    for second in range(len(frames)):
        text += FRAME_TIMESTAMP_MESSAGE.format(timestamp=f"00:{second:02d}") + _prompt_single_image(
            SMOL_TILE_TOKENS, "<fake_token_around_image>", "<image>", "<global-img>"
        )
    text += " what is in the image ? ASSISTANT:"
    pixels = processor.image_processor([frames], do_image_splitting=False, return_tensors="pt")
    encoded = processor.tokenizer([text], return_tensors="pt")
    return {**encoded, **pixels}


def test_video_frames_keep_their_timestamps(model, processor):
    frames = random_images(4, seed=5, size=(120, 160))
    inputs = video_inputs(processor, frames)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, budget_scope="per_image")
    prepared = vlmzip.prepare(model, inputs)
    original, reduced = inputs["input_ids"][0], prepared["input_ids"][0]
    assert runs(original) == [SMOL_TILE_TOKENS] * 4
    assert runs(reduced) == [DOMINANT + CONTEXTUAL] * 4  # a frame is a global image: the budget per frame
    # The timestamps and layout tokens between the frames are untouched, each still before its frame.
    assert original[original != SMOL_IMAGE_TOKEN_ID].tolist() == reduced[reduced != SMOL_IMAGE_TOKEN_ID].tolist()
    with torch.no_grad():
        reference = model.model.get_image_features(inputs["pixel_values"]).pooler_output[0]
    vlmzip.remove(model)
    vlmzip.apply(model, dominant=SMOL_TILE_TOKENS, contextual=0)
    full = vlmzip.prepare(model, inputs)["mm_encoder_outputs"]["image"].pooler_output
    assert torch.equal(torch.cat(list(full)), reference)
