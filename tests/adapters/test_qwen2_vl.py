"""Qwen2-VL and Qwen2.5-VL end to end on tiny random models of the real transformers classes.

Shared behaviour runs on both families (the `family` fixture); Qwen2.5-VL's window attention has
its own checks in test_qwen2_5_vl.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface

import vlmzip
from conftest import (
    QWEN_IMAGE_TOKEN_ID,
    QWEN_VIDEO_TOKEN_ID,
    make_qwen2_5_vl,
    make_qwen2_vl,
    make_qwen_processor,
    qwen_inputs_by_hand,
    qwen_prompt,
)
from helpers import (
    LanguageModelSpy,
    assert_apply_refused,
    assert_batch_equals_singles,
    assert_forward_prepares_raw_inputs,
    assert_generate_prepares_raw_inputs,
    assert_remove_restores_bit_identical_logits,
    original_rope_positions,
    parametrised_family_fixtures,
)
from vlmzip.adapters.qwen2_vl import probe_qwen_tower

FAMILIES = {"qwen2-vl": make_qwen2_vl, "qwen2.5-vl": make_qwen2_5_vl}
DOMINANT, CONTEXTUAL = 8, 4
BUDGET = DOMINANT + CONTEXTUAL


family, patched, processor = parametrised_family_fixtures(
    FAMILIES, make_qwen_processor, dominant=DOMINANT, contextual=CONTEXTUAL
)


def batch_inputs(processor, qwen_images):
    """Three samples: a large image, a small image, and two images of different sizes in one prompt."""
    large, large2, small, small2 = qwen_images
    prompts = [
        qwen_prompt("<image>"),
        qwen_prompt("<image>", question="how many are there ?"),
        qwen_prompt("<image>", "<image>", question="what is left of ?"),
    ]
    return processor(images=[large, small, small2, large2], text=prompts, return_tensors="pt", padding=True)


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, pad_token_id=0, **kwargs)


def test_language_model_receives_exactly_the_budget(patched, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    assert (inputs["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [54, 35, 35 + 54]
    prepared = vlmzip.prepare(patched, inputs)
    assert (prepared["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [BUDGET, BUDGET, 2 * BUDGET]
    assert (prepared["mm_token_type_ids"] == 1).sum(dim=1).tolist() == [BUDGET, BUDGET, 2 * BUDGET]
    features = prepared["mm_encoder_outputs"]["image"].pooler_output
    assert [tuple(f.shape) for f in features] == [(BUDGET, 64)] * 4
    for key in ("pixel_values", "image_grid_thw"):
        assert key not in prepared
    assert prepared["position_ids"].shape == (3, *prepared["input_ids"].shape)
    with LanguageModelSpy(patched) as spy:
        generate(patched, prepared)
    assert spy.shapes[0] == (3, prepared["input_ids"].shape[1], 64)
    assert all(shape[:2] == (3, 1) for shape in spy.shapes[1:])


def test_rope_positions_of_kept_tokens_are_the_original_ones(patched, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    original = original_rope_positions(patched, inputs)
    prepared = vlmzip.prepare(patched, inputs)
    encoded = vlmzip.api.get_state(patched).adapter.last_encoded
    positions = prepared["position_ids"]
    image = 0
    for sample in range(3):
        real_before = inputs["attention_mask"][sample].bool()
        real_after = prepared["attention_mask"][sample].bool()
        ids_before = inputs["input_ids"][sample][real_before]
        ids_after = prepared["input_ids"][sample][real_after]
        before = original[:, sample][:, real_before]
        after = positions[:, sample][:, real_after]
        # Text keeps its positions, in order.
        assert torch.equal(after[:, ids_after != QWEN_IMAGE_TOKEN_ID], before[:, ids_before != QWEN_IMAGE_TOKEN_ID])
        # Image tokens: the original position of each kept slot, run by run.
        runs_before = (ids_before == QWEN_IMAGE_TOKEN_ID).nonzero().squeeze(1)
        runs_after = (ids_after == QWEN_IMAGE_TOKEN_ID).nonzero().squeeze(1)
        offset_before = offset_after = 0
        while offset_after < runs_after.numel():
            full = int(encoded.full_counts[image])
            slots = encoded.slots[image]
            kept_before = runs_before[offset_before : offset_before + full][slots]
            kept_after = runs_after[offset_after : offset_after + slots.numel()]
            assert torch.equal(after[:, kept_after], before[:, kept_before])
            offset_before += full
            offset_after += slots.numel()
            image += 1
        # Monotone per sample: the text after each image starts above every image position before it.
        text_after = ids_after != QWEN_IMAGE_TOKEN_ID
        for index in range(1, after.shape[1]):
            if text_after[index]:
                assert int(after[:, index].min()) > int(after[:, :index].max())
    assert image == 4


@pytest.mark.parametrize(
    "generate_kwargs",
    [
        pytest.param({}, id="greedy"),
        pytest.param({"num_beams": 2}, id="beam"),
        pytest.param({"use_cache": False}, id="no-cache", marks=pytest.mark.slow),
    ],
)
def test_batched_generate_equals_per_sample(patched, processor, qwen_images, generate_kwargs):
    large, large2, small, small2 = qwen_images
    singles = [
        ([large], qwen_prompt("<image>")),
        ([small], qwen_prompt("<image>", question="how many are there ?")),
        ([small2, large2], qwen_prompt("<image>", "<image>", question="what is left of ?")),
    ]
    singles = [processor(images=images, text=[prompt], return_tensors="pt") for images, prompt in singles]
    assert_batch_equals_singles(
        patched, batch_inputs(processor, qwen_images), singles, max_new_tokens=4, do_sample=False, **generate_kwargs
    )


def test_images_and_video_in_one_prompt(patched, processor, qwen_images):
    # A video of 4 frames = 2 temporal slices of 8x8 patches (16 merged tokens each), then an image.
    inputs = qwen_inputs_by_hand(
        processor, qwen_prompt("<video>", "<image>"), images=qwen_images[:1], video_grids=[(2, 8, 8)]
    )
    assert (inputs["input_ids"] == QWEN_VIDEO_TOKEN_ID).sum() == 32
    original = original_rope_positions(patched, inputs)
    prepared = vlmzip.prepare(patched, inputs)
    ids = prepared["input_ids"][0]
    assert int((ids == QWEN_VIDEO_TOKEN_ID).sum()) == 2 * BUDGET  # the budget applies per temporal slice
    assert int((ids == QWEN_IMAGE_TOKEN_ID).sum()) == BUDGET
    outputs = prepared["mm_encoder_outputs"]
    assert [f.shape[0] for f in outputs["video"].pooler_output] == [2 * BUDGET]
    assert [f.shape[0] for f in outputs["image"].pooler_output] == [BUDGET]
    assert torch.equal(
        prepared["mm_token_type_ids"][0], (ids == QWEN_IMAGE_TOKEN_ID).long() + 2 * (ids == QWEN_VIDEO_TOKEN_ID)
    )

    encoded = vlmzip.api.get_state(patched).adapter.last_encoded
    assert encoded.modalities == ["video", "image"]
    video_slots = encoded.slots[0]
    assert int((video_slots < 16).sum()) == BUDGET and int((video_slots >= 16).sum()) == BUDGET
    video_before = (inputs["input_ids"][0] == QWEN_VIDEO_TOKEN_ID).nonzero().squeeze(1)
    video_after = (ids == QWEN_VIDEO_TOKEN_ID).nonzero().squeeze(1)
    assert torch.equal(prepared["position_ids"][:, 0, video_after], original[:, 0, video_before[video_slots]])
    # The two slices differ in their temporal position.
    assert prepared["position_ids"][0, 0, video_after].unique().numel() == 2
    generate(patched, prepared)


def test_video_budget_scope_and_temporal_step(family, processor):
    # Two temporal slices with identical patches: the second slice repeats the first exactly.
    inputs = qwen_inputs_by_hand(processor, qwen_prompt("<video>"), video_grids=[(2, 8, 8)])
    half = inputs["pixel_values_videos"].shape[0] // 2
    inputs["pixel_values_videos"][half:] = inputs["pixel_values_videos"][:half]

    def video_tokens(**config):
        model = FAMILIES[family]()
        vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, **config)
        prepared = vlmzip.prepare(model, inputs)
        count = int((prepared["input_ids"] == QWEN_VIDEO_TOKEN_ID).sum())
        assert prepared["mm_encoder_outputs"]["video"].pooler_output[0].shape[0] == count
        return model, prepared, count

    assert video_tokens()[2] == 2 * BUDGET
    assert video_tokens(budget_scope="per_image")[2] == 2 * (DOMINANT // 2 + CONTEXTUAL // 2)
    # The temporal step drops the second slice's dominant tokens; its contextual tokens stay.
    model, prepared, count = video_tokens(temporal_threshold=0.99)
    assert count == BUDGET + CONTEXTUAL
    generate(model, prepared)


def test_forward_and_generate_prepare_raw_inputs(patched, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    assert_generate_prepares_raw_inputs(patched, inputs, max_new_tokens=4, do_sample=False)
    assert_forward_prepares_raw_inputs(patched, inputs, exact=False)


def test_remove_restores_bit_identical_logits(family, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    assert_remove_restores_bit_identical_logits(FAMILIES[family], inputs, dominant=DOMINANT, contextual=CONTEXTUAL)


@pytest.mark.parametrize("method", ["pool", "random", "visionzip-dominant"])
def test_other_methods_same_budget(family, processor, qwen_images, method):
    model = FAMILIES[family]()
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, method=method)
    prepared = vlmzip.prepare(model, batch_inputs(processor, qwen_images))
    assert (prepared["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [BUDGET, BUDGET, 2 * BUDGET]
    for slots in vlmzip.api.get_state(model).adapter.last_encoded.slots:
        assert slots.numel() == BUDGET and bool((slots.diff() > 0).all())
    generate(model, prepared)


# --- the probe ---------------------------------------------------------------------------------
_RECORDED: list[torch.Tensor] = []


def _recording_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    weights = (query.float() @ key.float().transpose(-1, -2) * scaling).softmax(dim=-1)
    _RECORDED.append((module, weights))
    return (weights.to(value.dtype) @ value).transpose(1, 2).contiguous(), weights


AttentionInterface.register("visionzip_test_recording", _recording_attention)


def test_probe_scores_equal_eager_received_attention(family, processor, qwen_images):
    model = FAMILIES[family]()
    tower = model.model.visual
    pixels = processor.image_processor(qwen_images[1:3], return_tensors="pt")
    probes = probe_qwen_tower(tower, pixels["pixel_values"], pixels["image_grid_thw"])
    assert [p.features.shape[1] for p in probes] == [54, 35]

    tower.config._attn_implementation = "visionzip_test_recording"
    _RECORDED.clear()
    with torch.no_grad():
        merged = tower(pixels["pixel_values"], grid_thw=pixels["image_grid_thw"]).pooler_output
    block = tower.blocks[max(getattr(tower.config, "fullatt_block_indexes", [len(tower.blocks) - 1]))]
    weights = [w for module, w in _RECORDED if module is block.attn]
    assert [w.shape[-1] for w in weights] == [216, 140]  # one full-attention segment per image
    received = torch.cat([w[0].mean(dim=1).sum(dim=0) for w in weights]).view(-1, 4).sum(dim=1)
    if hasattr(tower, "fullatt_block_indexes"):
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(pixels["image_grid_thw"], 2, tower.config.window_size, 14)
        received = received[torch.argsort(window_index)]
    torch.testing.assert_close(torch.cat([p.scores[0] for p in probes]), received, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([p.features[0] for p in probes]), merged, rtol=1e-4, atol=1e-5)
    assert [p.grid for p in probes] == [(6, 9), (5, 7)]


# --- errors ------------------------------------------------------------------------------------
def test_budget_larger_than_an_image_is_an_error(family, processor, qwen_images):
    model = FAMILIES[family]()
    vlmzip.apply(model, dominant=30, contextual=10)
    large_only = processor(images=qwen_images[:1], text=[qwen_prompt("<image>")], return_tensors="pt")
    assert (vlmzip.prepare(model, large_only)["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum() == 40
    with pytest.raises(ValueError, match=r"dominant \+ contextual must be <= 35 .*image 1.*5x7.*got 30 \+ 10 = 40"):
        vlmzip.prepare(model, batch_inputs(processor, qwen_images))


def test_bad_config_and_inputs(family, processor, qwen_images):
    model = FAMILIES[family]()
    assert_apply_refused(model, ValueError, "feature_layer: Qwen2-VL", dominant=8, contextual=4, feature_layer=-2)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    inputs = batch_inputs(processor, qwen_images)
    without_grid = {k: v for k, v in inputs.items() if k != "image_grid_thw"}
    with pytest.raises(ValueError, match=r"inputs\['image_grid_thw'\] is required"):
        vlmzip.prepare(model, without_grid)
    with pytest.raises(ValueError, match=r"inputs\['pixel_values'\] must be the processor's flattened"):
        vlmzip.prepare(model, {**inputs, "pixel_values": inputs["pixel_values"][:10]})
    with pytest.raises(ValueError, match=r"image_grid_thw'\] must hold positive"):
        vlmzip.prepare(model, {**inputs, "image_grid_thw": inputs["image_grid_thw"] + 1})
    with pytest.raises(ValueError, match="3 image.*placeholders for 4|more image placeholder runs"):
        fewer = {**inputs, "image_grid_thw": inputs["image_grid_thw"][:3]}
        fewer["pixel_values"] = inputs["pixel_values"][: int(fewer["image_grid_thw"].prod(dim=1).sum())]
        vlmzip.prepare(model, fewer)
    with pytest.raises(ValueError, match="position_ids"):
        vlmzip.prepare(model, {**inputs, "position_ids": torch.zeros_like(inputs["input_ids"])})
    with pytest.raises(ValueError, match="input_ids"):
        vlmzip.prepare(model, {k: v for k, v in inputs.items() if k != "input_ids"})
    text_only = processor.tokenizer(["USER: how many ? ASSISTANT:"], return_tensors="pt")
    assert vlmzip.prepare(model, text_only).keys() == dict(text_only).keys()
