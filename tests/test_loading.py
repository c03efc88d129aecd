"""Local model and image loading: the happy path and every error a user can make."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from conftest import make_llava, make_llava_processor, random_images
from families import make_smolvlm, make_smolvlm_processor
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


def test_a_processor_with_a_video_slot_loads_without_torchvision_or_is_refused(tmp_path):
    """SmolVLM's processor needs a video processor (torchvision); it loads without one. A processor class
    transformers does not know would load as the bare tokenizer, dropping images: that is refused."""
    make_smolvlm().save_pretrained(tmp_path)
    make_smolvlm_processor().save_pretrained(tmp_path)
    config_path = tmp_path / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["processor_class"] = "SmolVLMProcessor"  # what a released checkpoint names
    config_path.write_text(json.dumps(config))
    _, processor = load_model(tmp_path)
    assert type(processor).__name__ == "SmolVLMProcessor"
    inputs = processor(images=[random_images(1)], text=["<image> what ?"], return_tensors="pt")
    assert inputs["pixel_values"].ndim == 5
    config["processor_class"] = "SomeCustomProcessor"
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"cannot load an image processor from {tmp_path}: .*processor_class"):
        load_model(tmp_path)
