"""The tiny serving models load with `vlmzip.loading.load_model` and read an image, with and without
torchvision (vLLM's environment has it, the main one does not: there the processor is images-only)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    LlavaForConditionalGeneration,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from vlmzip.loading import load_model
from vlmzip.serving.tiny import (
    IMAGE_TOKEN,
    QWEN_VOCABULARY,
    build_tiny_llava,
    build_tiny_qwen2_5_vl,
    build_tiny_qwen3_vl,
)

QWEN_IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"


@pytest.mark.parametrize(
    ("build", "model_class", "image", "image_token_id", "merge"),
    [
        (build_tiny_llava, LlavaForConditionalGeneration, IMAGE_TOKEN, None, None),
        (
            build_tiny_qwen2_5_vl,
            Qwen2_5_VLForConditionalGeneration,
            QWEN_IMAGE,
            QWEN_VOCABULARY.index("<|image_pad|>"),
            4,
        ),
        (build_tiny_qwen3_vl, Qwen3VLForConditionalGeneration, QWEN_IMAGE, QWEN_VOCABULARY.index("<|image_pad|>"), 4),
    ],
    ids=["llava", "qwen2.5-vl", "qwen3-vl"],
)
def test_tiny_model_loads_and_reads_an_image(tmp_path, build, model_class, image, image_token_id, merge):
    out = build(tmp_path / "tiny", seed=1)
    model, processor = load_model(out)
    assert type(model) is model_class
    inputs = processor(
        images=[Image.new("RGB", (200, 150), (40, 90, 200))],
        text=[f"USER: {image} what ? ASSISTANT:"],
        return_tensors="pt",
    )
    token_id = image_token_id if image_token_id is not None else model.config.image_token_id
    placeholders = int((inputs["input_ids"] == token_id).sum())
    if merge is not None:  # one placeholder per merged 2x2 patch of the image's grid
        assert placeholders == int(inputs["image_grid_thw"].prod()) // merge
    assert placeholders > 0
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape
    assert torch.isfinite(logits).all()
