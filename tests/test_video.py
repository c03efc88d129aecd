"""The temporal-redundancy step (vlmzip.video) alone and through the LLaVA-OneVision adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import vlmzip
from families import IMAGE_TOKEN_ID, make_onevision, make_onevision_processor, random_video, static_video
from helpers import removed_after
from vlmzip.video import redundant_tokens, temporal_keep_mask

PROMPT = ["USER: <video> what is in the image ? ASSISTANT:"]


def test_redundant_tokens_compares_each_position_with_the_previous_frame():
    first = torch.randn(3, 4)
    second = first.clone()
    second[1] = -first[1]  # position 1 flips direction: cosine -1
    second[2] = first[2] * 3.0  # same direction, other norm: cosine 1
    third = torch.randn(3, 4)
    frames = torch.stack([first, second, third])
    redundant = redundant_tokens(frames, 0.99)
    assert redundant[0].tolist() == [False, False, False]  # the first frame is never redundant
    assert redundant[1].tolist() == [True, False, True]
    cosine = torch.nn.functional.cosine_similarity(third, second, dim=-1)
    assert redundant[2].tolist() == (cosine >= 0.99).tolist()


def test_threshold_one_means_identical_within_float_error():
    token = torch.randn(1, 1, 7)
    frames = torch.cat([token, token * (1 + 1e-7), token + 1e-2])
    assert redundant_tokens(frames, 1.0)[:, 0].tolist() == [False, True, False]


def test_keep_mask_drops_only_redundant_dominant_tokens():
    frames = torch.randn(3, 6, 4)
    frames[1, [0, 2, 5]] = frames[0, [0, 2, 5]]  # positions 0, 2, 5 repeat in frame 1
    frames[2] = frames[1]  # frame 2 repeats frame 1 everywhere
    kept = torch.tensor([[0, 2, 3], [0, 2, 3], [1, 4, 5]])
    keep = temporal_keep_mask(frames, kept, tokens_per_frame=5, threshold=0.999)
    assert keep.tolist() == [
        [True, True, True, True, True],
        [False, False, True, True, True],  # 0 and 2 repeat; the two merged tokens always stay
        [False, False, False, True, True],
    ]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: redundant_tokens(torch.randn(2, 3), 0.9), ValueError, "frames must have 3 dimensions"),
        (lambda: redundant_tokens([[1.0]], 0.9), TypeError, "frames must be a torch.Tensor"),
        (lambda: redundant_tokens(torch.randn(2, 3, 4), 0.0), ValueError, r"threshold must be a number in \(0, 1\]"),
        (lambda: redundant_tokens(torch.randn(2, 3, 4), 1.5), ValueError, "threshold"),
        (lambda: redundant_tokens(torch.randn(2, 3, 4), math.nan), ValueError, "threshold"),
        (lambda: redundant_tokens(torch.randn(2, 3, 4), True), TypeError, "threshold"),
        (
            lambda: temporal_keep_mask(torch.randn(2, 3, 4), torch.zeros(3, 1, dtype=torch.long), 2, 0.9),
            ValueError,
            "kept_indices has 3 frames",
        ),
        (
            lambda: temporal_keep_mask(torch.randn(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), 1, 0.9),
            ValueError,
            "tokens_per_frame must be >= the dominant tokens per frame",
        ),
    ],
)
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ValueError), (-0.5, ValueError), (1.01, ValueError), (math.nan, ValueError), ("0.9", TypeError)],
)
def test_config_validates_temporal_threshold(value, error):
    with pytest.raises(error, match="temporal_threshold"):
        vlmzip.VisionZipConfig(temporal_threshold=value)
    assert vlmzip.VisionZipConfig(temporal_threshold=1).temporal_threshold == 1.0
    assert vlmzip.VisionZipConfig().temporal_threshold is None  # off by default


@pytest.fixture(scope="module")
def processor():
    return make_onevision_processor()


@pytest.fixture
def model():
    yield from removed_after(make_onevision())


def test_identical_frames_keep_only_the_first_frame_and_merged_tokens(model, processor):
    still = np.repeat(random_video(1, seed=3), 5, axis=0)  # 5 identical frames
    vlmzip.apply(model, dominant=6, contextual=2, temporal_threshold=1.0)
    prepared = vlmzip.prepare(model, processor(videos=[still], text=PROMPT, return_tensors="pt"))
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum().item() == (6 + 2) + 4 * 2 + 1


def test_static_background_video(model, processor):
    inputs = processor(videos=[static_video(frames=6, size=196, square=40)], text=PROMPT, return_tensors="pt")
    vlmzip.apply(model, dominant=8, contextual=2)
    plain = vlmzip.prepare(model, inputs)["mm_encoder_outputs"]["image"].pooler_output[0]
    adapter = vlmzip.api.get_state(model).adapter
    reduction = adapter.last_encoded.reductions[0]
    vlmzip.remove(model)
    vlmzip.apply(model, dominant=8, contextual=2, temporal_threshold=0.98)
    reduced = vlmzip.prepare(model, inputs)["mm_encoder_outputs"]["image"].pooler_output[0]
    # What the step should drop, computed from the pooled frames the model itself produces.
    with torch.no_grad():
        frames = model.model.get_video_features(inputs["pixel_values_videos"]).pooler_output[0, :-1].view(6, 16, -1)
    redundant = redundant_tokens(frames, 0.98).gather(1, reduction.kept_indices)
    assert redundant.any() and not redundant[0].any()
    assert reduced.shape[0] == plain.shape[0] - int(redundant.sum())
    torch.testing.assert_close(reduced[:10], plain[:10])  # frame 0 untouched
    torch.testing.assert_close(reduced[-1], plain[-1])  # the newline closes the video
    merged = plain[:-1].view(6, 10, -1)[:, 8:]  # every frame's contextual tokens survive
    assert all(any(torch.equal(token, row) for row in reduced) for token in merged.flatten(0, 1))
