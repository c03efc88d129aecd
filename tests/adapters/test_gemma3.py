"""Gemma 3 end to end on a tiny random Gemma3ForConditionalGeneration (SigLIP 448/14, 4x4-pooled soft tokens)."""

from __future__ import annotations

import pytest
import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

import vlmzip
from conftest import random_images
from families import GEMMA_IMAGE_TOKEN_ID, GEMMA_SOFT_TOKENS, GEMMA_WORDS, make_gemma3, make_gemma3_processor
from helpers import (
    TEXT_ONLY_PROMPT,
    FamilyChecks,
    assert_apply_refused,
    assert_generate_prepares_raw_inputs,
    family_fixtures,
    one_image_prompts,
    two_image_prompt,
    visual_tokens_reaching_llm,
)
from reference import reference_received_attention, reference_units, reference_visionzip
from test_conversation import run_two_image_dialogue

BOI, EOI = GEMMA_WORDS.index("<start_of_image>"), GEMMA_WORDS.index("<end_of_image>")
PROMPTS = one_image_prompts("<start_of_image>")
TEXT_ONLY = TEXT_ONLY_PROMPT
TWO_IMAGES = two_image_prompt("<start_of_image>")
DOMINANT, CONTEXTUAL = 12, 4


processor, images, model = family_fixtures(make_gemma3, make_gemma3_processor, lambda: random_images(3))


def process(processor, images, prompts):
    """One list of images per prompt (a prompt without "<start_of_image>" gets none)."""
    per_prompt, given = [], iter(images)
    for prompt in prompts:
        per_prompt.append([next(given) for _ in range(prompt.count("<start_of_image>"))])
    if not any(per_prompt):
        per_prompt = None
    return processor(images=per_prompt, text=prompts, return_tensors="pt", padding=True)


def batch(processor, images):
    """An image, a text-only row, another image (left-padded)."""
    return process(processor, [images[0], images[2]], [PROMPTS[0], TEXT_ONLY, PROMPTS[2]])


def singles(processor, images):
    return [
        process(processor, [images[0]], PROMPTS[:1]),
        process(processor, [], [TEXT_ONLY]),
        process(processor, [images[2]], PROMPTS[2:]),
    ]


class TestFamilyChecks(FamilyChecks):
    make_model = staticmethod(make_gemma3)
    dominant, contextual = DOMINANT, CONTEXTUAL
    batch, singles = staticmethod(batch), staticmethod(singles)
    # A generated placeholder would be no image slot in the replay of a sampled path.
    generate_options = {"suppress_tokens": [GEMMA_IMAGE_TOKEN_ID]}


# --- a literal reference of the Gemma 3 reduction, independent of the library -----------------------
def reference_features(model, pixel_values, dominant, contextual):
    """VisionZip on Gemma 3 written out with loops: per image, a (dominant + contextual, text_hidden) tensor.

    Scores: attention each patch receives in the last SigLIP layer (softmax over keys, mean over all
    queries, sum over heads), recomputed from that layer's input; a soft token's score and key are the
    mean over its 4x4 patches; features are the post-layernorm last hidden state pooled alike. Top
    `dominant` soft tokens (ascending), the rest merged onto evenly spaced targets by cosine similarity
    of keys (target + mean of its members), then RMSNorm and projection.
    """
    tower = model.model.vision_tower
    projector = model.model.multi_modal_projector
    layer = tower.encoder.layers[-1]
    heads = tower.config.num_attention_heads
    with torch.no_grad():
        out = tower(pixel_values=pixel_values, output_hidden_states=True)
        hidden = layer.layer_norm1(out.hidden_states[-2])
        queries, keys = layer.self_attn.q_proj(hidden), layer.self_attn.k_proj(hidden)
    side = projector.patches_per_image
    kernel = side // projector.tokens_per_side
    results = []
    for image in range(pixel_values.shape[0]):
        per_head = [t[image].view(side * side, heads, -1).transpose(0, 1) for t in (queries, keys)]
        received = reference_received_attention(*per_head)
        # A soft token's score and key are its patches' means (the sum over kernel**2 patches, scaled).
        unit_scores, unit_keys = reference_units(received, per_head[1].mean(dim=0), side, side, kernel)
        unit_scores = [score / kernel**2 for score in unit_scores]
        _, unit_features = reference_units(received, out.last_hidden_state[image], side, side, kernel)
        reduced = reference_visionzip(torch.stack(unit_features), unit_scores, unit_keys, dominant, contextual)
        with torch.no_grad():
            results.append(projector.mm_soft_emb_norm(reduced) @ projector.mm_input_projection_weight)
    return results


def test_features_equal_a_literal_reference(model, processor, images):
    inputs = process(processor, images[:2], PROMPTS[:2])
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    features = prepared["mm_encoder_outputs"]["image"].pooler_output
    expected = reference_features(model, inputs["pixel_values"], DOMINANT, CONTEXTUAL)
    assert features.shape == (2, DOMINANT + CONTEXTUAL, 64)
    for image in range(2):
        torch.testing.assert_close(features[image], expected[image], rtol=1e-4, atol=1e-5)


def test_dominant_tokens_are_the_models_own_soft_tokens(model, processor, images):
    inputs = process(processor, images[:2], PROMPTS[:2])
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    kept = vlmzip.api.get_state(model).adapter.last_encoded.reductions[0].kept_indices
    with torch.no_grad():
        own = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (2, 64, hidden)
    features = prepared["mm_encoder_outputs"]["image"].pooler_output
    assert kept.shape == (2, DOMINANT) and bool((kept.diff(dim=1) > 0).all())
    torch.testing.assert_close(features[:, :DOMINANT], own.gather(1, kept[..., None].expand(-1, -1, 64)))


def test_exact_tokens_and_token_types_reach_the_language_model(model, processor, images):
    inputs = process(processor, images[:2] + images[2:], [*PROMPTS[:2], TEXT_ONLY, PROMPTS[2]])
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    ids = prepared["input_ids"]
    per_row = (ids == GEMMA_IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert per_row == [16, 16, 0, 16]
    # token_type_ids mark exactly the reduced image tokens, so each image stays one bidirectional block.
    assert torch.equal(prepared["token_type_ids"].bool(), ids == GEMMA_IMAGE_TOKEN_ID)
    # <start_of_image> and <end_of_image> stay as text around the shortened run.
    for row in (0, 1, 3):
        tokens = ids[row][prepared["attention_mask"][row].bool()].tolist()
        start = tokens.index(BOI)
        assert tokens[start + 1 : start + 17] == [GEMMA_IMAGE_TOKEN_ID] * 16 and tokens[start + 17] == EOI
    reached = visual_tokens_reaching_llm(model, prepared, GEMMA_IMAGE_TOKEN_ID)
    torch.testing.assert_close(reached, prepared["mm_encoder_outputs"]["image"].pooler_output.flatten(0, 1))
    assert ids.shape[1] < GEMMA_SOFT_TOKENS  # the 64-token runs never reached the language model


def test_reduced_image_tokens_attend_bidirectionally(model, processor, images):
    """Changing an image's last reduced token changes the state of its first one (not without token types)."""
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, process(processor, images[:1], PROMPTS[:1]))
    first = prepared["input_ids"][0].tolist().index(GEMMA_IMAGE_TOKEN_ID)
    features = prepared["mm_encoder_outputs"]["image"].pooler_output

    def first_image_state(changed: bool, with_types: bool) -> torch.Tensor:
        feats = features.clone()
        if changed:
            feats[0, -1] += 1.0
        inputs = {**prepared, "mm_encoder_outputs": {"image": BaseModelOutputWithPooling(pooler_output=feats)}}
        if not with_types:
            inputs.pop("token_type_ids")
        with torch.no_grad():
            return model(**inputs, output_hidden_states=True).hidden_states[-1][0, first]

    assert not torch.allclose(first_image_state(False, True), first_image_state(True, True))
    torch.testing.assert_close(first_image_state(False, False), first_image_state(True, False), rtol=0, atol=0)


def test_several_images_in_one_prompt(model, processor, images):
    inputs = process(processor, images[:2], [TWO_IMAGES])
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    assert int((prepared["input_ids"] == GEMMA_IMAGE_TOKEN_ID).sum()) == 2 * 16
    # Two blocks of 16 with text between: the bidirectional mask keeps them apart.
    types = prepared["token_type_ids"][0].tolist()
    assert "".join(map(str, types)).count("1" * 16) == 2 and "1" * 17 not in "".join(map(str, types))
    assert_generate_prepares_raw_inputs(model, inputs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dominant": 60, "contextual": 5}, r"dominant \+ contextual must be <= 64 \(the soft tokens .* 8 x 8 pooled"),
        ({"dominant": 0}, "dominant must be an integer >= 1"),
        ({"feature_layer": 4}, r"feature_layer must be in \[-3, -1\] or \[1, 3\]"),
    ],
)
def test_impossible_budgets_are_refused_at_apply(model, kwargs, match):
    assert_apply_refused(model, ValueError, match, **kwargs)


def test_whole_budget_and_per_image_scope(model, processor, images):
    inputs = process(processor, images[:1], PROMPTS[:1])
    vlmzip.apply(model, dominant=60, contextual=4, budget_scope="per_image")  # the image is its only unit
    prepared = vlmzip.prepare(model, inputs)
    assert int((prepared["input_ids"] == GEMMA_IMAGE_TOKEN_ID).sum()) == 64


def test_mismatched_inputs_are_refused(model, processor, images):
    inputs = process(processor, images[:2], PROMPTS[:2])
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    with pytest.raises(ValueError, match="pixel_values"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][:, :, :224]})
    with pytest.raises(ValueError, match="placeholder"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][:1]})


@pytest.mark.parametrize("method", ["pool", "random", "divprune", "tome", "visionzip-dominant"])
def test_other_methods_keep_the_budget(model, processor, images, method):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, method=method)
    prepared = vlmzip.prepare(model, process(processor, images[:2], PROMPTS[:2]))
    assert (prepared["input_ids"] == GEMMA_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [16, 16]


def test_conversation_turns_equal_fresh_runs(model, images):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    tower = model.model.vision_tower
    chat = run_two_image_dialogue(model, make_gemma3_processor(), images, tower, "<start_of_image>")
    assert int((chat.input_ids == GEMMA_IMAGE_TOKEN_ID).sum()) == 2 * 16


def test_pan_and_scan_crops_are_reduced_like_images(model, processor):
    wide = random_images(1, size=(300, 1200))[0]
    inputs = processor(
        images=[[wide]], text=PROMPTS[:1], return_tensors="pt", do_pan_and_scan=True, pan_and_scan_min_crop_size=64
    )
    crops = inputs["pixel_values"].shape[0]
    assert crops == 5 and int((inputs["input_ids"] == GEMMA_IMAGE_TOKEN_ID).sum()) == crops * 64
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    assert int((prepared["input_ids"] == GEMMA_IMAGE_TOKEN_ID).sum()) == crops * 16
    assert torch.equal(prepared["token_type_ids"].bool(), prepared["input_ids"] == GEMMA_IMAGE_TOKEN_ID)


def test_no_cache_equals_cache(model, processor, images):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, process(processor, images[:2], PROMPTS[:2]))
    with torch.no_grad():
        cached = model.generate(**prepared, max_new_tokens=4, pad_token_id=0)
        uncached = model.generate(**prepared, max_new_tokens=4, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, uncached)
