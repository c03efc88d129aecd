"""InternVL end to end on a tiny random InternVLForConditionalGeneration (InternViT 224/14 tiles, pixel shuffle)."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from families import (
    INTERNVL_IMAGE_TOKEN_ID,
    INTERNVL_WORDS,
    make_internvl,
    make_internvl_processor,
)
from helpers import (
    TEXT_ONLY_PROMPT,
    FamilyChecks,
    assert_apply_refused,
    assert_generate_prepares_raw_inputs,
    assert_strategy_refused,
    family_fixtures,
    images_of_sizes,
    one_image_prompts,
    two_image_prompt,
    visual_tokens_reaching_llm,
)
from reference import reference_units, reference_visionzip
from test_conversation import run_two_image_dialogue
from vlmzip.adapters.internvl import image_runs

START, END = INTERNVL_WORDS.index("<img>"), INTERNVL_WORDS.index("</img>")
PROMPTS = one_image_prompts("<IMG_CONTEXT>")
TEXT_ONLY = TEXT_ONLY_PROMPT
TWO_IMAGES = two_image_prompt("<IMG_CONTEXT>")
# (height, width) -> tiles under max_patches=4 (thumbnail included when there is more than one tile).
SIZES_AND_TILES = [((300, 400), 5), ((200, 200), 1), ((224, 600), 4)]
DOMINANT, CONTEXTUAL = 12, 4


processor, images, model = family_fixtures(
    make_internvl, make_internvl_processor, lambda: images_of_sizes(size for size, _ in SIZES_AND_TILES)
)


def process(processor, images, prompts):
    return processor(images=list(images) or None, text=prompts, return_tensors="pt", padding=True)


def image_counts(prepared):
    return image_runs(prepared["input_ids"], prepared["attention_mask"], INTERNVL_IMAGE_TOKEN_ID)


def batch(processor, images):
    """Two images in one prompt, a text-only row, a third image (left-padded)."""
    return process(processor, [images[0], images[1], images[2]], [TWO_IMAGES, TEXT_ONLY, PROMPTS[2]])


def singles(processor, images):
    return [
        process(processor, images[:2], [TWO_IMAGES]),
        process(processor, [], [TEXT_ONLY]),
        process(processor, images[2:], PROMPTS[2:]),
    ]


class TestFamilyChecks(FamilyChecks):
    make_model = staticmethod(make_internvl)
    dominant, contextual = DOMINANT, CONTEXTUAL
    batch, singles = staticmethod(batch), staticmethod(singles)
    # A generated placeholder would be no image slot in the replay of a sampled path.
    generate_options = {"suppress_tokens": [INTERNVL_IMAGE_TOKEN_ID]}


# --- a literal reference of the InternVL reduction, independent of the library ----------------------
def reference_tile(model, pixel_values, dominant, contextual):
    """VisionZip on one InternVL tile written out with loops: (dominant + contextual, text_hidden).

    A unit is the 2x2 block of patches (2r + i, 2c + j) that the pixel shuffle stacks; its score is the
    sum of the [CLS] attention (last layer, softmax over all tokens, summed over heads) of its patches,
    its key the mean of their head-averaged keys. Top `dominant` units (ascending), the rest merged onto
    evenly spaced targets by cosine similarity (target + mean of its members), then the projector.
    """
    tower = model.model.vision_tower
    layer = tower.encoder.layer[-1]
    heads = tower.config.num_attention_heads
    with torch.no_grad():
        out = tower(pixel_values=pixel_values[None], output_hidden_states=True)
        hidden = layer.layernorm_before(out.hidden_states[-2])[0]
        attention = layer.attention  # q_norm / k_norm are identities unless the tower normalises q and k
        queries, keys = attention.q_norm(attention.q_proj(hidden)), attention.k_norm(attention.k_proj(hidden))
        side = int((hidden.shape[0] - 1) ** 0.5)
        patches = out.last_hidden_state[0, 1:].reshape(1, side, side, -1)
        unit_features = model.model.pixel_shuffle(patches, scale_factor=0.5).reshape((side // 2) ** 2, -1)
    head_dim = queries.shape[-1] // heads
    cls_attention = [0.0] * hidden.shape[0]
    for head in range(heads):
        q = queries[0, head * head_dim : (head + 1) * head_dim]
        k = keys[:, head * head_dim : (head + 1) * head_dim]
        row = ((k @ q) * head_dim**-0.5).softmax(dim=0)
        for token in range(hidden.shape[0]):
            cls_attention[token] += float(row[token])
    key_mean = keys.view(hidden.shape[0], heads, head_dim).mean(dim=1)
    unit_scores, unit_keys = reference_units(cls_attention, key_mean, side, side, 2, first=1)  # after [CLS]
    tokens = reference_visionzip(unit_features, unit_scores, unit_keys, dominant, contextual)
    with torch.no_grad():
        return model.model.multi_modal_projector(tokens)


@pytest.mark.parametrize(
    "vision_options",
    [{}, {"use_qk_norm": True, "norm_type": "rms_norm", "use_mean_pooling": False}],
    ids=["internvit-300m", "qk-norm-final-layernorm"],
)
def test_features_equal_a_literal_reference(processor, images, vision_options):
    model = make_internvl(**vision_options)
    inputs = process(processor, images[:2], PROMPTS[:2])  # 5 tiles + 1 tile
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    features = prepared["mm_encoder_outputs"]["image"].pooler_output.squeeze(1)
    expected = torch.cat([reference_tile(model, tile, DOMINANT, CONTEXTUAL) for tile in inputs["pixel_values"]])
    assert features.shape == (6 * 16, 64)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)


def test_units_are_the_pixel_shuffle_blocks(model):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    members = vlmzip.api.get_state(model).adapter.unit_members(torch.device("cpu"))
    assert members.shape == (64, 4)
    for unit, patches in enumerate(members.tolist()):
        r, c = divmod(unit, 8)
        assert sorted(patches) == sorted((2 * r + i) * 16 + 2 * c + j for i in range(2) for j in range(2))


def test_exact_tokens_per_tile_reach_the_language_model(model, processor, images):
    inputs = process(processor, images, [PROMPTS[0], PROMPTS[1], PROMPTS[2]])
    assert image_counts(inputs) == [tiles * 64 for _, tiles in SIZES_AND_TILES]
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    assert image_counts(prepared) == [tiles * 16 for _, tiles in SIZES_AND_TILES]
    for row in range(3):  # <img> and </img> stay as text around the shortened run
        tokens = prepared["input_ids"][row][prepared["attention_mask"][row].bool()].tolist()
        start, count = tokens.index(START), SIZES_AND_TILES[row][1] * 16
        assert tokens[start + 1 : start + 1 + count] == [INTERNVL_IMAGE_TOKEN_ID] * count
        assert tokens[start + 1 + count] == END
    reached = visual_tokens_reaching_llm(model, prepared, INTERNVL_IMAGE_TOKEN_ID)
    torch.testing.assert_close(reached, prepared["mm_encoder_outputs"]["image"].pooler_output.squeeze(1))


def test_tiles_in_processor_order_each_dominant_then_contextual(model, processor, images):
    inputs = process(processor, images[:1], PROMPTS[:1])
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    features = prepared["mm_encoder_outputs"]["image"].pooler_output.squeeze(1).view(5, 16, -1)
    reduction = vlmzip.api.get_state(model).adapter.last_encoded.reductions[0]
    with torch.no_grad():
        own = model.model.get_image_features(inputs["pixel_values"]).pooler_output  # (5 tiles, 64, hidden)
    kept = reduction.kept_indices
    assert kept.shape == (5, DOMINANT) and bool((kept.diff(dim=1) > 0).all())
    # A dominant token is the model's own projected unit (the projector is per token).
    torch.testing.assert_close(features[:, :DOMINANT], own.gather(1, kept[..., None].expand(-1, -1, own.shape[-1])))


@pytest.mark.parametrize(
    ("dominant", "contextual", "expected"),
    [(50, 10, [5 * (10 + 2), 1 * (50 + 10), 4 * (12 + 2)]), (20, 0, [5 * 4, 20, 4 * 5])],
)
def test_per_image_budget_is_split_over_the_tiles(model, processor, images, dominant, contextual, expected):
    vlmzip.apply(model, dominant=dominant, contextual=contextual, budget_scope="per_image")
    prepared = vlmzip.prepare(model, process(processor, images, PROMPTS))
    assert image_counts(prepared) == expected
    assert all(count <= dominant + contextual for count in expected)


def test_several_images_in_one_prompt_and_text_only_rows(model, processor, images):
    inputs = process(processor, [images[0], images[1]], [TWO_IMAGES, TEXT_ONLY])
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    assert image_counts(prepared) == [5 * 16, 1 * 16]
    assert (prepared["input_ids"][1] == INTERNVL_IMAGE_TOKEN_ID).sum() == 0
    assert_generate_prepares_raw_inputs(model, inputs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"dominant": 60, "contextual": 5},
            r"dominant \+ contextual must be <= 64 \(the tokens this model gives each tile",
        ),
        ({"temporal_threshold": 0.9}, "temporal_threshold applies to videos"),
        ({"feature_layer": -4}, r"feature_layer must be in \[-3, -1\] or \[1, 3\]"),
    ],
)
def test_impossible_budgets_are_refused_at_apply(model, kwargs, match):
    assert_apply_refused(model, ValueError, match, **kwargs)


def test_full_feature_strategy_is_refused():
    assert_strategy_refused(make_internvl(), "full")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"dominant": 60, "contextual": 10},
            r"image 1 of 1 tile\(s\) would give each tile 60 \+ 10 tokens, more than the 64",
        ),
        ({"dominant": 4, "contextual": 0}, r"dominant must be >= the number of crops / frames \(5\)"),
    ],
)
def test_impossible_per_image_budgets_are_refused_at_prepare(model, processor, images, kwargs, match):
    vlmzip.apply(model, budget_scope="per_image", **kwargs)
    calls = []
    handle = model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            vlmzip.prepare(model, process(processor, images[:2], PROMPTS[:2]))
    finally:
        handle.remove()
    assert not calls  # refused before the tower runs


def test_mismatched_inputs_are_refused(model, processor, images):
    inputs = process(processor, images[:2], PROMPTS[:2])
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    with pytest.raises(ValueError, match=r"placeholders for 6 tiles .* pixel_values has 5"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][:5]})
    with pytest.raises(ValueError, match="pixel_values"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][:, :, :100]})
    ids = inputs["input_ids"].clone()
    ids[0, ids[0].tolist().index(INTERNVL_IMAGE_TOKEN_ID)] = 5
    with pytest.raises(ValueError, match="multiple of 64"):
        vlmzip.prepare(model, {**inputs, "input_ids": ids})


@pytest.mark.parametrize("method", ["pool", "random", "divprune", "tome", "visionzip-dominant"])
def test_other_methods_keep_the_budget(model, processor, images, method):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, method=method)
    prepared = vlmzip.prepare(model, process(processor, images[:2], PROMPTS[:2]))
    assert image_counts(prepared) == [5 * 16, 16]


def test_conversation_turns_equal_fresh_runs(model, images):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    tower = model.model.vision_tower
    chat = run_two_image_dialogue(model, make_internvl_processor(), images, tower, "<IMG_CONTEXT>")
    assert int((chat.input_ids == INTERNVL_IMAGE_TOKEN_ID).sum()) == (5 + 1) * 16


def test_video_frames_are_reduced_like_one_tile_images(model, processor):
    """InternVL's processor writes each video frame as "FrameN: <img>" + one tile of placeholders + "</img>".

    Its video processor needs torchvision (absent here), so the expansion is written out as it does it.
    """
    frames = 3
    tile = " ".join(["<IMG_CONTEXT>"] * 64)
    video = " ".join(f"<img> {tile} </img>" for _ in range(frames))
    text = processor.tokenizer([f"USER: {video} what is in the image ? ASSISTANT:"], return_tensors="pt")
    pixel_values = torch.randn(frames, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    inputs = {**text, "pixel_values": pixel_values}
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    assert image_counts(prepared) == [16] * frames
    assert_generate_prepares_raw_inputs(model, inputs)
