"""LLaVA-NeXT end to end on a tiny random LlavaNextForConditionalGeneration (CLIP 336/14 crops, AnyRes grid)."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import random_images
from families import IMAGE_TOKEN_ID, make_llava_next, make_llava_next_processor
from helpers import (
    assert_apply_refused,
    assert_batch_equals_singles,
    assert_generate_prepares_raw_inputs,
    assert_remove_restores_bit_identical_logits,
    assert_strategy_refused,
    family_fixtures,
    images_of_sizes,
    one_image_prompts,
    visual_tokens_reaching_llm,
)
from test_conversation import run_two_image_dialogue
from vlmzip.adapters.llava_next import anyres_layout

PROMPTS = one_image_prompts()
# (height, width) -> crops (base included) under the default pinpoints: 1x2 grid, 1x3 grid, 2x2 grid.
SIZES_AND_CROPS = [((150, 300), 3), ((200, 700), 4), ((500, 600), 5)]


processor, images, model = family_fixtures(
    make_llava_next, make_llava_next_processor, lambda: images_of_sizes(size for size, _ in SIZES_AND_CROPS)
)


def process(processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def test_anyres_layout_reference_order():
    # 2x2 grid of crops, 2x2 patches each, one [CLS]; token value = 100 * crop + token index.
    crops, tokens = 5, 1 + 4 + 2  # 5 tokens per crop + 2 stand-ins for contextual tokens
    features = (100 * torch.arange(crops)[:, None] + torch.arange(tokens)[None]).float().unsqueeze(-1)
    # Dominant: [CLS] + the patches at (0, 0) and (1, 1) of each crop (token indices 1 and 4).
    kept = torch.tensor([[0, 1, 4]] * crops)
    reduced = torch.cat([features.gather(1, kept.unsqueeze(-1)), features[:, 5:]], dim=1)  # (crops, 3 + 2, 1)
    out = anyres_layout(reduced, kept, crop_grid=(2, 2), patch_grid=(2, 2), num_prefix_tokens=1)
    stitched = [101, 201, 104, 204, 301, 401, 304, 404]  # row-major over the 4x4 stitched grid
    cls = [100, 200, 300, 400]
    contextual = [105, 106, 205, 206, 305, 306, 405, 406]
    assert out.squeeze(-1).tolist() == [0, 1, 4, 5, 6, *stitched, *cls, *contextual]


def test_anyres_layout_single_crop_and_no_dominant():
    features = torch.randn(1, 6, 3)
    assert torch.equal(anyres_layout(features, torch.zeros(1, 0, dtype=torch.long), (0, 0), (2, 2), 1), features[0])
    # Methods without dominant tokens (pool): the grid crops' tokens follow the base crop in crop order.
    features = torch.arange(3 * 2).float().view(3, 2, 1)
    out = anyres_layout(features, torch.zeros(3, 0, dtype=torch.long), (1, 2), (2, 2), 1)
    assert out.squeeze(-1).tolist() == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match="crop grid"):
        anyres_layout(features, torch.zeros(3, 0, dtype=torch.long), (2, 2), (2, 2), 1)


def test_exact_tokens_reach_the_language_model(model, processor, images):
    inputs = process(processor, images, PROMPTS)
    assert inputs["pixel_values"].shape[1] == 5  # padded to the largest crop count
    vlmzip.apply(model, dominant=54, contextual=10)
    prepared = vlmzip.prepare(model, inputs)
    expected_counts = [crops * 64 for _, crops in SIZES_AND_CROPS]
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == expected_counts
    features = prepared["mm_encoder_outputs"]["image"].pooler_output
    assert [f.shape[0] for f in features] == expected_counts
    reached = visual_tokens_reaching_llm(model, prepared)
    # Rows are in sequence order, which is image order here (one image per sample).
    torch.testing.assert_close(reached, torch.cat(features), rtol=0, atol=0)
    assert prepared["input_ids"].shape[1] < 320 + 30  # the ~2000-token sequences never reached the LLM


def test_features_are_per_crop_visionzip_in_reference_layout(model, processor, images):
    inputs = process(processor, images[:1], PROMPTS[:1])  # 3 crops: base + a 1x2 grid
    vlmzip.apply(model, dominant=20, contextual=4)
    prepared = vlmzip.prepare(model, inputs)
    crops = inputs["pixel_values"][0, :3]
    with torch.no_grad():
        reduction = vlmzip.compress_vision(model.model.vision_tower, crops, 20, 4)
        projected = model.model.multi_modal_projector(reduction.features)
    expected = anyres_layout(projected, reduction.kept_indices, (1, 2), (24, 24), 1)
    torch.testing.assert_close(prepared["mm_encoder_outputs"]["image"].pooler_output[0], expected)
    # The base crop comes first and unchanged: [CLS] first, then its dominant patches, then contextual.
    torch.testing.assert_close(expected[:24], projected[0])


@pytest.mark.parametrize(
    ("dominant", "contextual", "expected"),
    [
        (540, 100, [3 * (180 + 33), 4 * (135 + 25), 5 * (108 + 20)]),
        (270, 50, [3 * (90 + 16), 4 * (67 + 12), 5 * (54 + 10)]),
        (135, 25, [3 * (45 + 8), 4 * (33 + 6), 5 * (27 + 5)]),
    ],
    ids=["640", "320", "160"],
)
def test_paper_totals_per_image_whatever_the_crop_count(model, processor, images, dominant, contextual, expected):
    vlmzip.apply(model, dominant=dominant, contextual=contextual, budget_scope="per_image")
    prepared = vlmzip.prepare(model, process(processor, images, PROMPTS))
    counts = (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert counts == expected
    assert all(count <= dominant + contextual for count in counts)
    assert counts[2] == dominant + contextual  # 5 crops: the paper's split, exactly


@pytest.mark.parametrize("generate_kwargs", [{}, {"num_beams": 2}], ids=["greedy", "beam"])
def test_batched_generate_equals_per_sample(model, processor, images, generate_kwargs):
    vlmzip.apply(model, dominant=54, contextual=10)
    singles = [process(processor, images[i : i + 1], PROMPTS[i : i + 1]) for i in range(len(images))]
    assert_batch_equals_singles(model, process(processor, images, PROMPTS), singles, **generate_kwargs)


def test_two_images_across_turns(model, processor, images):
    prompt = "USER: <image> what is in the image ? ASSISTANT: a cat USER: <image> what is left of ? ASSISTANT:"
    inputs = processor(images=[images[0], images[2]], text=[prompt], return_tensors="pt")
    vlmzip.apply(model, dominant=30, contextual=6)
    prepared = vlmzip.prepare(model, inputs)
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum().item() == (3 + 5) * 36
    ids = prepared["input_ids"][0].tolist()
    first = ids.index(IMAGE_TOKEN_ID)
    assert ids[first : first + 3 * 36] == [IMAGE_TOKEN_ID] * (3 * 36)  # first image's run, then text
    assert ids[first + 3 * 36] != IMAGE_TOKEN_ID
    assert_generate_prepares_raw_inputs(model, inputs, max_new_tokens=5)


def test_remove_restores_bit_identical_logits(processor, images):
    inputs = process(processor, images[:2], PROMPTS[:2])
    assert_remove_restores_bit_identical_logits(make_llava_next, inputs, dominant=54, contextual=10)


def test_labels_shrink_with_the_sequence(model, processor, images):
    inputs = process(processor, images[:2], PROMPTS[:2])
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    labels = labels.masked_fill(inputs["attention_mask"] == 0, -100)
    vlmzip.apply(model, dominant=54, contextual=10)
    prepared = vlmzip.prepare(model, {**inputs, "labels": labels})
    text = (prepared["input_ids"] != IMAGE_TOKEN_ID) & prepared["attention_mask"].bool()
    assert torch.equal(prepared["labels"][text], prepared["input_ids"][text])
    with torch.no_grad():
        assert torch.isfinite(model(**prepared).loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dominant": 570, "contextual": 10}, r"dominant \+ contextual must be <= 577 .*per crop"),
        (
            {"dominant": 1700, "contextual": 100, "budget_scope": "per_image"},
            r"an image of 3 crops .* would give each crop 566 \+ 33 tokens, more than the 577",
        ),
        (
            {"dominant": 4, "contextual": 0, "budget_scope": "per_image"},
            r"dominant must be >= the number of crops / frames \(5\)",
        ),
        ({"budget_scope": "per_frame"}, "budget_scope must be one of"),
        ({"temporal_threshold": 0.9}, "temporal_threshold applies to videos; LlavaNextForConditionalGeneration"),
    ],
)
def test_bad_budgets_are_refused_at_apply(model, kwargs, match):
    assert_apply_refused(model, ValueError, match, **kwargs)


def test_full_feature_strategy_is_refused():
    assert_strategy_refused(make_llava_next(), "full")


def test_budget_larger_than_a_narrow_image(model, processor):
    narrow = random_images(1, size=(100, 1000))[0]  # a 1x3 grid, mostly padding: few placeholders
    vlmzip.apply(model, dominant=500, contextual=77)
    with pytest.raises(ValueError, match=r"image 0: the budget gives 2308 tokens .* only \d+ placeholders"):
        vlmzip.prepare(model, process(processor, [narrow], PROMPTS[:1]))


def test_mismatched_inputs_are_refused(model, processor, images):
    inputs = process(processor, images[:2], PROMPTS[:2])
    vlmzip.apply(model, dominant=54, contextual=10)
    no_sizes = {k: v for k, v in inputs.items() if k != "image_sizes"}
    with pytest.raises(ValueError, match="image_sizes"):
        vlmzip.prepare(model, no_sizes)
    with pytest.raises(ValueError, match="pixel_values"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][:, :2]})
    with pytest.raises(ValueError, match="pixel_values"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][0, 0]})
    swapped = {**inputs, "image_sizes": inputs["image_sizes"].flip(0)}  # counts no longer match the text
    with pytest.raises(ValueError, match="placeholder"):
        vlmzip.prepare(model, swapped)


@pytest.mark.parametrize("method", ["pool", "random", "visionzip-dominant"])
def test_other_methods_keep_the_budget(model, processor, images, method):
    vlmzip.apply(model, dominant=54, contextual=10, method=method)
    prepared = vlmzip.prepare(model, process(processor, images[:2], PROMPTS[:2]))
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [3 * 64, 4 * 64]
    with torch.no_grad():
        model.generate(**prepared, max_new_tokens=5, pad_token_id=0)


def test_conversation_turns_equal_fresh_runs(model, images):
    vlmzip.apply(model, dominant=54, contextual=10)
    chat = run_two_image_dialogue(model, make_llava_next_processor(), images, model.model.vision_tower)
    assert int((chat.input_ids == IMAGE_TOKEN_ID).sum()) == (3 + 4) * 64
