"""Local model and image loading: the happy path and every error a user can make."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import make_llava, make_llava_processor, random_images
from vlmzip.loading import load_image, load_model


def test_load_image(tmp_path):
    path = tmp_path / "a.png"
    random_images(1)[0].save(path)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (400, 300)


def test_load_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="not a file"):
        load_image(tmp_path)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ValueError, match="not a readable image"):
        load_image(text)
    big = tmp_path / "big.png"
    Image.new("RGB", (200, 200)).save(big)
    with pytest.raises(ValueError, match="image too large"):
        load_image(big, max_pixels=100)
    truncated = tmp_path / "cut.png"
    random_images(1)[0].save(tmp_path / "full.png")
    truncated.write_bytes((tmp_path / "full.png").read_bytes()[:300])
    with pytest.raises(ValueError, match="image"):
        load_image(truncated)


def test_load_model_round_trip(tmp_path):
    model = make_llava()
    model.save_pretrained(tmp_path)
    make_llava_processor(padding_side="right").save_pretrained(tmp_path)
    loaded, processor = load_model(tmp_path)
    assert type(loaded).__name__ == "LlavaForConditionalGeneration"
    assert processor.tokenizer.padding_side == "left"
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_load_model_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(tmp_path / "nope")
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(ValueError, match="supported"):
        load_model(tmp_path)
