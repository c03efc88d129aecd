"""The offline builders shared by the benchmark architectures, the tiny serving model and the tests."""

from __future__ import annotations

import pytest
from PIL import Image
from transformers import LlavaProcessor
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlmzip.synthetic import llava_style_processor, tiny_clip_vision_config, tiny_llama_config, word_level_tokenizer

WORDS = ["<pad>", "<unk>", "</s>", "<s>", "<image>", "USER:", "cat"]


def test_tokenizer_ids_follow_the_vocabulary_and_pad_left():
    tokenizer = word_level_tokenizer(WORDS, extra_special_tokens={"image_token": "<image>"})
    assert tokenizer(["USER: cat dog"])["input_ids"] == [[5, 6, 1]]  # unknown word -> <unk>, no BOS added
    batch = tokenizer(["cat", "USER: cat"], padding=True)["input_ids"]
    assert batch == [[0, 6], [5, 6]]
    assert tokenizer.image_token == "<image>" and tokenizer.chat_template is None
    mapped = word_level_tokenizer({"<unk>": 0, "<s>": 1, "</s>": 2, "<|pad|>": 9}, pad_token="<|pad|>")
    assert mapped.pad_token_id == 9


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"vocabulary": "<unk> <s>"}, TypeError, "vocabulary must be a sequence"),
        ({"vocabulary": ["<unk>", "<s>", "</s>"]}, ValueError, r"vocabulary must contain \['<pad>'\]"),
        ({"vocabulary": WORDS, "padding_side": "middle"}, ValueError, "padding_side"),
    ],
)
def test_tokenizer_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        word_level_tokenizer(**kwargs)


def test_llava_processor_expands_one_placeholder_per_patch_plus_cls():
    tokenizer = word_level_tokenizer(WORDS, extra_special_tokens={"image_token": "<image>"})
    processor = llava_style_processor(LlavaProcessor, CLIPImageProcessorPil, tokenizer, image_size=56, patch_size=14)
    inputs = processor(images=[Image.new("RGB", (80, 60))], text=["USER: <image> cat"], return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert int((inputs["input_ids"] == 4).sum()) == 4 * 4  # "default" strategy drops [CLS]
    with pytest.raises(ValueError, match="strategy"):
        llava_style_processor(LlavaProcessor, CLIPImageProcessorPil, tokenizer, strategy="cls")
    with pytest.raises(ValueError, match="image_size"):
        llava_style_processor(LlavaProcessor, CLIPImageProcessorPil, tokenizer, image_size=0)


def test_tiny_configs():
    vision = tiny_clip_vision_config(hidden_size=16, layers=2, initializer_range=0.5)
    assert (vision.intermediate_size, vision.projection_dim, vision.initializer_range) == (32, 16, 0.5)
    text = tiny_llama_config(10, max_position_embeddings=128)
    assert (text.hidden_size, text.intermediate_size, text.vocab_size) == (64, 128, 10)
    assert text.max_position_embeddings == 128
    assert (text.pad_token_id, text.eos_token_id, text.bos_token_id) == (0, 2, 3)
    with pytest.raises(ValueError, match="vocab_size"):
        tiny_llama_config(3)
    with pytest.raises(TypeError, match="layers"):
        tiny_clip_vision_config(layers=2.0)
