"""LLaVA-OneVision end to end on a tiny random LlavaOnevisionForConditionalGeneration (SigLIP, no [CLS]).

Crops are 98 px / patch 14 (7 x 7 = 49 tokens); video frames are pooled by the model to 4 x 4 = 16.
"""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import clip_vision_config
from families import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, make_onevision, make_onevision_processor, random_video
from helpers import (
    assert_apply_refused,
    assert_batch_equals_singles,
    assert_remove_restores_bit_identical_logits,
    assert_strategy_refused,
    family_fixtures,
    generated_tokens,
    images_of_sizes,
    run_lengths,
    visual_tokens_reaching_llm,
)
from test_conversation import run_two_image_dialogue

PER_FRAME = 16  # pooled tokens per frame
# (height, width) -> crops (base included): a 1x3 grid, a 2x2 grid, a 3x3 grid.
SIZES_AND_CROPS = [((90, 300), 4), ((120, 120), 5), ((300, 400), 10)]
PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> how many are there ? ASSISTANT:"]
VIDEO_PROMPTS = ["USER: <video> what is in the image ? ASSISTANT:", "USER: <video> how many ? ASSISTANT:"]


processor, images, model = family_fixtures(
    make_onevision, make_onevision_processor, lambda: images_of_sizes(size for size, _ in SIZES_AND_CROPS)
)


@pytest.fixture(scope="module")
def videos():
    return [random_video(4, seed=10), random_video(4, seed=11)]


def test_image_crops_reach_the_language_model_exactly(model, processor, images):
    inputs = processor(images=images, text=PROMPTS + PROMPTS[:1], return_tensors="pt", padding=True)
    vlmzip.apply(model, dominant=8, contextual=2)
    prepared = vlmzip.prepare(model, inputs)
    expected = [crops * 10 for _, crops in SIZES_AND_CROPS]
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == expected
    features = prepared["mm_encoder_outputs"]["image"].pooler_output
    torch.testing.assert_close(visual_tokens_reaching_llm(model, prepared), torch.cat(features), rtol=0, atol=0)


def test_images_of_a_multi_image_sample_are_single_crops(model, processor, images):
    prompt = "USER: <image> what is in the image ? ASSISTANT: a cat USER: <image> what is left of ? ASSISTANT:"
    inputs = processor(images=[images[:2], images[2:]], text=[prompt, PROMPTS[0]], return_tensors="pt", padding=True)
    assert inputs["batch_num_images"].tolist() == [2, 1]
    vlmzip.apply(model, dominant=8, contextual=2)
    prepared = vlmzip.prepare(model, inputs)
    assert run_lengths(prepared["input_ids"][0], IMAGE_TOKEN_ID) == [10, 10]
    assert run_lengths(prepared["input_ids"][1], IMAGE_TOKEN_ID) == [10 * 10]
    batch = generated_tokens(model, inputs)
    alone = generated_tokens(model, processor(images=[images[:2]], text=[prompt], return_tensors="pt"))
    assert batch[0] == alone[0]


def test_video_frames_reach_the_language_model_exactly(model, processor, videos):
    inputs = processor(videos=videos, text=VIDEO_PROMPTS, return_tensors="pt", padding=True)
    assert (inputs["input_ids"] == VIDEO_TOKEN_ID).sum(dim=1).tolist() == [4 * PER_FRAME + 1] * 2
    vlmzip.apply(model, dominant=6, contextual=2)
    prepared = vlmzip.prepare(model, inputs)
    # Videos travel as images (one tensor per video): 8 tokens per frame + the newline.
    assert (prepared["input_ids"] == VIDEO_TOKEN_ID).sum().item() == 0
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [4 * 8 + 1] * 2
    features = prepared["mm_encoder_outputs"]["image"].pooler_output
    torch.testing.assert_close(visual_tokens_reaching_llm(model, prepared), torch.cat(features), rtol=0, atol=0)
    torch.testing.assert_close(features[0][-1], model.model.image_newline)


def test_video_selection_happens_on_the_pooled_tokens_the_model_uses(model, processor, videos):
    inputs = processor(videos=videos, text=VIDEO_PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        pooled = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output  # (2, 4 * 16 + 1, h)
    frames = pooled[:, :-1].reshape(2 * 4, PER_FRAME, -1)
    # Every pooled token kept as dominant: exactly the model's own video features.
    vlmzip.apply(model, dominant=PER_FRAME, contextual=0)
    full = vlmzip.prepare(model, inputs)["mm_encoder_outputs"]["image"].pooler_output
    torch.testing.assert_close(torch.stack(full), pooled)
    vlmzip.remove(model)
    # A real budget: the dominant tokens are the model's pooled tokens at the kept positions.
    vlmzip.apply(model, dominant=5, contextual=3)
    adapter = vlmzip.api.get_state(model).adapter
    features = vlmzip.prepare(model, inputs)["mm_encoder_outputs"]["image"].pooler_output
    reduction = adapter.last_encoded.reductions[0]
    assert reduction.kept_indices.shape == (8, 5)
    dominant = frames.gather(1, reduction.kept_indices.unsqueeze(-1).expand(-1, -1, frames.shape[-1]))
    per_frame = torch.stack(features)[:, :-1].reshape(8, 8, -1)
    torch.testing.assert_close(per_frame[:, :5], dominant)


def test_video_logits_match_the_model_when_nothing_is_dropped(processor, videos):
    inputs = processor(videos=videos, text=VIDEO_PROMPTS, return_tensors="pt", padding=True)
    reference, model = make_onevision(), make_onevision()
    vlmzip.apply(model, dominant=PER_FRAME, contextual=0)
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits, reference(**inputs).logits)


def test_images_and_videos_interleaved_in_text_order(model, processor, images, videos):
    texts = ["USER: <image> a <video> the <image> what ? ASSISTANT:", "USER: <video> <image> what is it ? ASSISTANT:"]
    image_groups = [[images[0], images[1]], [images[2]]]
    inputs = processor(images=image_groups, videos=videos, text=texts, return_tensors="pt", padding=True)
    vlmzip.apply(model, dominant=8, contextual=2)
    prepared = vlmzip.prepare(model, inputs)
    assert run_lengths(prepared["input_ids"][0], IMAGE_TOKEN_ID) == [10, 4 * 10 + 1, 10]
    # Adjacent runs (no text between) merge once videos travel as images.
    assert run_lengths(prepared["input_ids"][1], IMAGE_TOKEN_ID) == [4 * 10 + 1 + 10 * 10]
    singles = [
        processor(images=[image_groups[i]], videos=videos[i : i + 1], text=texts[i : i + 1], return_tensors="pt")
        for i in range(2)
    ]
    assert_batch_equals_singles(model, inputs, singles, num_beams=2)


@pytest.mark.parametrize(
    ("temporal_threshold", "generate_kwargs"),
    [(None, {}), (0.5, {"num_beams": 2})],
    ids=["frames-greedy", "temporal-beam"],
)
def test_batched_video_generate_equals_per_sample(model, processor, videos, temporal_threshold, generate_kwargs):
    vlmzip.apply(model, dominant=6, contextual=2, temporal_threshold=temporal_threshold)
    inputs = processor(videos=videos, text=VIDEO_PROMPTS, return_tensors="pt", padding=True)
    counts = (vlmzip.prepare(model, inputs)["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    if temporal_threshold is not None:
        # Random frames still share a lot at 0.5, and differently per video: lengths differ.
        assert all(count < 4 * 8 + 1 for count in counts) and counts[0] != counts[1]
    singles = [
        processor(videos=videos[i : i + 1], text=VIDEO_PROMPTS[i : i + 1], return_tensors="pt") for i in range(2)
    ]
    assert_batch_equals_singles(model, inputs, singles, **generate_kwargs)


def test_batched_image_beam_search_equals_per_sample(model, processor, images):
    vlmzip.apply(model, dominant=8, contextual=2)
    inputs = processor(images=images[:2], text=PROMPTS, return_tensors="pt", padding=True)
    singles = [processor(images=images[i : i + 1], text=PROMPTS[i : i + 1], return_tensors="pt") for i in range(2)]
    assert_batch_equals_singles(model, inputs, singles, num_beams=2)


def test_remove_restores_bit_identical_logits(processor, images, videos):
    inputs = processor(
        images=[[images[0]], [images[1]]],
        videos=videos,
        text=[t + " <video>" for t in PROMPTS],
        return_tensors="pt",
        padding=True,
    )
    assert_remove_restores_bit_identical_logits(
        make_onevision, inputs, dominant=8, contextual=2, temporal_threshold=0.9
    )


def test_per_image_scope_splits_a_video_over_its_frames(model, processor, videos):
    vlmzip.apply(model, dominant=20, contextual=9, budget_scope="per_image")
    prepared = vlmzip.prepare(model, processor(videos=videos, text=VIDEO_PROMPTS, return_tensors="pt", padding=True))
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [4 * (5 + 2) + 1] * 2


def test_video_budget_above_the_pooled_tokens_is_refused(model, processor, videos):
    vlmzip.apply(model, dominant=15, contextual=2)  # fine for 49-token image crops
    inputs = processor(videos=videos, text=VIDEO_PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match=r"dominant \+ contextual must be <= 16 per video frame"):
        vlmzip.prepare(model, inputs)
    vlmzip.remove(model)
    vlmzip.apply(model, dominant=10, contextual=0, budget_scope="per_image")  # 10: the most crops an image has
    long_video = processor(videos=[random_video(12)], text=VIDEO_PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match=r"dominant must be >= the number of crops / frames \(12\)"):
        vlmzip.prepare(model, long_video)


def test_image_budget_larger_than_the_placeholders(model, processor, images):
    vlmzip.apply(model, dominant=14, contextual=2)  # 10 crops x 16 > the 145 packed features
    inputs = processor(images=images[2:], text=PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match=r"image 0: the budget gives 160 tokens .* only 145 placeholders"):
        vlmzip.prepare(model, inputs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dominant": 45, "contextual": 5}, ValueError, r"dominant \+ contextual must be <= 49"),
        ({"temporal_threshold": 0.0}, ValueError, r"temporal_threshold must be a number in \(0, 1\]"),
        ({"temporal_threshold": "0.9"}, TypeError, "temporal_threshold"),
        ({"dominant": 9, "budget_scope": "per_image"}, ValueError, r"crops / frames \(10\)"),
    ],
)
def test_bad_configs_are_refused_at_apply(model, kwargs, error, match):
    assert_apply_refused(model, error, match, **kwargs)


def test_unsupported_model_variants():
    assert_strategy_refused(make_onevision(), "default")
    config = make_onevision().config
    config.vision_config = clip_vision_config(image_size=98)
    with pytest.raises(ValueError, match=r"without \[CLS\]"):
        vlmzip.apply(type(make_onevision())(config))


def test_mismatched_inputs_are_refused(model, processor, images, videos):
    vlmzip.apply(model, dominant=8, contextual=2)
    inputs = processor(videos=videos, text=VIDEO_PROMPTS, return_tensors="pt", padding=True)
    with pytest.raises(ValueError, match="pixel_values_videos"):
        vlmzip.prepare(model, {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][0]})
    with pytest.raises(ValueError, match=r"2 video\(s\) were given but the text holds placeholders for 1"):
        vlmzip.prepare(model, {**inputs, "input_ids": inputs["input_ids"][:1], "attention_mask": None})
    with pytest.raises(ValueError, match="more video placeholder runs"):
        vlmzip.prepare(model, {**inputs, "pixel_values_videos": inputs["pixel_values_videos"][:1]})
    image_inputs = processor(images=images[:1], text=PROMPTS[:1], return_tensors="pt")
    with pytest.raises(ValueError, match=r"1 image\(s\) were given but the text holds placeholders for 0"):
        vlmzip.prepare(model, {**inputs, **{k: image_inputs[k] for k in ("pixel_values", "image_sizes")}})


def test_conversation_turns_equal_fresh_runs(model, images):
    vlmzip.apply(model, dominant=8, contextual=2)
    chat = run_two_image_dialogue(model, make_onevision_processor(), images, model.model.vision_tower)
    assert int((chat.input_ids == IMAGE_TOKEN_ID).sum()) == (4 + 5) * 10
