"""Tiny random-initialised models of the real transformers classes, shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402

torch.set_num_threads(2)

WORDS = (
    "<pad> <unk> </s> <s> <image> USER: ASSISTANT: what is in the image ? a cat dog red blue how many are "
    "there left right of above below shape circle square one two three four five yes no big small"
).split()
IMAGE_TOKEN_ID = WORDS.index("<image>")


def make_tokenizer(padding_side: str = "left") -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side=padding_side,
    )


def clip_vision_config(
    image_size: int = 336, patch_size: int = 14, layers: int = 4, heads: int = 4
) -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=32,
    )


def make_llava(strategy: str = "default", seed: int = 0) -> LlavaForConditionalGeneration:
    text_config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(WORDS),
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=3,
    )
    config = LlavaConfig(
        vision_config=clip_vision_config(),
        text_config=text_config,
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def make_llava_processor(strategy: str = "default", padding_side: str = "left") -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=make_tokenizer(padding_side),
        patch_size=14,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
    )


def random_images(count: int, seed: int = 0, size: tuple[int, int] = (300, 400)) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="session")
def llava() -> LlavaForConditionalGeneration:
    return make_llava()


@pytest.fixture(scope="session")
def llava_processor() -> LlavaProcessor:
    return make_llava_processor()


@pytest.fixture
def fresh_llava() -> LlavaForConditionalGeneration:
    """A model the test may patch; identical weights to `llava`."""
    return make_llava()


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    return random_images(4)


@pytest.fixture(scope="session")
def clip_tower() -> CLIPVisionModel:
    torch.manual_seed(1)
    return CLIPVisionModel(clip_vision_config()).eval()


@pytest.fixture(scope="session")
def dinov2_tower() -> Dinov2Model:
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=2,
        image_size=224,
        patch_size=14,
        layerscale_value=0.5,
    )
    torch.manual_seed(2)
    return Dinov2Model(config).eval()
