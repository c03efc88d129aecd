"""Qwen2.5-VL specifics: scores from the last full-attention block, window permutation undone, video timing.

The behaviour shared with Qwen2-VL (token counts, batching, M-RoPE, remove) runs on both families in
test_qwen2_vl.py.
"""

from __future__ import annotations

import pytest
import torch
from transformers.vision_utils import get_vision_window_index

import vlmzip
from conftest import QWEN_VIDEO_TOKEN_ID, make_qwen2_5_vl, make_qwen_processor, qwen_inputs_by_hand, qwen_prompt
from conftest import random_images as make_images
from helpers import assert_apply_refused, original_rope_positions
from vlmzip.adapters.qwen2_vl import QWEN_TOWER_LAYOUTS, probe_qwen_tower


@pytest.fixture(scope="module")
def processor():
    return make_qwen_processor()


@pytest.fixture(scope="module")
def pixels(processor):
    return processor.image_processor(
        make_images(1, seed=5) + make_images(1, seed=6, size=(150, 200)), return_tensors="pt"
    )


def test_scores_come_from_the_last_full_attention_block():
    tower = make_qwen2_5_vl().model.visual
    assert list(tower.fullatt_block_indexes) == [1] and len(tower.blocks) == 3
    assert QWEN_TOWER_LAYOUTS[type(tower).__name__].score_block(tower) == 1


def test_window_permutation_is_undone(pixels):
    # Scored at block 0 (its input is the patch embedding, the same with or without windows), the scores
    # and keys of a tower whose windows permute the tokens equal those of one whose single window does not.
    tower = make_qwen2_5_vl().model.visual
    tower.fullatt_block_indexes = [0]
    grid = pixels["image_grid_thw"]
    window_index, _ = get_vision_window_index(grid, 2, tower.window_size, tower.patch_size)
    assert not torch.equal(window_index, torch.arange(window_index.numel()))
    with torch.no_grad():
        windowed = probe_qwen_tower(tower, pixels["pixel_values"], grid)
        tower.window_size = 10_000  # one window per image: no permutation
        plain = probe_qwen_tower(tower, pixels["pixel_values"], grid)
    for a, b in zip(windowed, plain, strict=True):
        torch.testing.assert_close(a.scores, b.scores, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(a.scores, a.scores.flip(1))  # the comparison is not vacuous


def test_tower_without_full_attention_block_is_refused():
    model = make_qwen2_5_vl()
    model.model.visual.fullatt_block_indexes = []
    assert_apply_refused(model, ValueError, "no full-attention block", dominant=8, contextual=4)


def test_video_time_spacing_is_kept(processor):
    # second_per_grid_ts spaces the temporal rope positions of a video's slices; kept tokens keep them.
    model = make_qwen2_5_vl()
    vlmzip.apply(model, dominant=6, contextual=2)
    inputs = qwen_inputs_by_hand(processor, qwen_prompt("<video>"), video_grids=[(3, 8, 8)])
    inputs["second_per_grid_ts"] = torch.tensor([2.0])
    original = original_rope_positions(model, inputs)
    prepared = vlmzip.prepare(model, inputs)
    assert "second_per_grid_ts" not in prepared and "video_grid_thw" not in prepared
    slots = vlmzip.api.get_state(model).adapter.last_encoded.slots[0]
    before = (inputs["input_ids"][0] == QWEN_VIDEO_TOKEN_ID).nonzero().squeeze(1)
    after = (prepared["input_ids"][0] == QWEN_VIDEO_TOKEN_ID).nonzero().squeeze(1)
    assert after.numel() == 3 * 8
    kept_positions = prepared["position_ids"][:, 0, after]
    assert torch.equal(kept_positions, original[:, 0, before[slots]])
    temporal = kept_positions[0].unique()
    assert temporal.numel() == 3 and int(temporal[1] - temporal[0]) > 1  # spaced by time, not by one
    with torch.no_grad():
        model.generate(**prepared, max_new_tokens=2, do_sample=False, pad_token_id=0)
