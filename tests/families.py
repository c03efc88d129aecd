"""Tiny random-initialised multi-crop, tiled and video models (LLaVA-NeXT, LLaVA-OneVision, SmolVLM, Mistral 3,
Gemma 3, InternVL) and their processors (Qwen3-VL and Qwen3.5: tests/families_qwen3.py), and the registry
of every supported family (FAMILIES).

Real transformers classes with small widths; crop and grid geometry is kept small too so that the
unreduced model (needed to check `remove()`) stays cheap on CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from transformers import (
    BatchFeature,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionProcessor,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    SiglipVisionConfig,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMProcessor,
)
from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

from conftest import (
    QWEN_IMAGE_TOKEN_ID,
    WORDS,
    clip_vision_config,
    make_llava,
    make_llava_processor,
    make_qwen2_5_vl,
    make_qwen2_vl,
    make_qwen_processor,
    make_tokenizer,
    qwen_prompt,
)
from families_qwen3 import (  # noqa: F401  (re-exported: tests import every family's fixtures from here)
    QWEN3_DEEPSTACK,
    QWEN3_PATCH,
    QWEN3_PATCH_FEATURES,
    make_qwen3_5,
    make_qwen3_5_moe,
    make_qwen3_processor,
    make_qwen3_vl,
    make_qwen3_vl_moe,
)
from vlmzip.bench.arch import NEXT_PINPOINTS
from vlmzip.loading import image_only_processor_class
from vlmzip.pixtral_processor import PixtralPilProcessor
from vlmzip.synthetic import llava_style_processor, tiny_llama_config, word_level_tokenizer

IMAGE_TOKEN_ID = WORDS.index("<image>")
VIDEO_TOKEN_ID = len(WORDS)  # "<video>" is added after the shared vocabulary
VOCAB_SIZE = len(WORDS) + 1

# LLaVA-NeXT: the real 336 px / patch 14 crop geometry (577 tokens per crop with [CLS]) and its
# default grid pinpoints (NEXT_PINPOINTS), so that the paper's per-image budgets (e.g. 540 + 100) are representable.
NEXT_CROP = 336

# LLaVA-OneVision: 98 px / patch 14 crops = a 7 x 7 grid (49 tokens, no [CLS]); pooled video frames
# are ceil(7 / 2)^2 = 16 tokens. Up to 3 x 3 crops; "anyres_max_2" so that large grids take the
# model's downscaling branch.
OV_CROP = 98
OV_PATCH = 14
OV_PINPOINTS = [[98 * r, 98 * c] for r in (1, 2, 3) for c in (1, 2, 3)]
OV_ASPECT = "anyres_max_2"


def make_llava_next(seed: int = 0) -> LlavaNextForConditionalGeneration:
    config = LlavaNextConfig(
        vision_config=clip_vision_config(image_size=NEXT_CROP),
        text_config=tiny_llama_config(VOCAB_SIZE),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=NEXT_PINPOINTS,
    )
    torch.manual_seed(seed)
    return LlavaNextForConditionalGeneration(config).eval()


def make_llava_next_processor(padding_side: str = "left") -> LlavaNextProcessor:
    return llava_style_processor(
        LlavaNextProcessor,
        LlavaNextImageProcessorPil,
        make_tokenizer(padding_side),
        image_size=NEXT_CROP,
        image_grid_pinpoints=NEXT_PINPOINTS,
    )


def siglip_vision_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=OV_CROP,
        patch_size=OV_PATCH,
        vision_use_head=False,
    )


def make_onevision(seed: int = 0) -> LlavaOnevisionForConditionalGeneration:
    config = LlavaOnevisionConfig(
        vision_config=siglip_vision_config(),
        text_config=tiny_llama_config(VOCAB_SIZE),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        image_grid_pinpoints=OV_PINPOINTS,
        vision_aspect_ratio=OV_ASPECT,
    )
    torch.manual_seed(seed)
    return LlavaOnevisionForConditionalGeneration(config).eval()


class PilVideoProcessor:
    """Frames through the PIL image processor: what LlavaOnevisionVideoProcessor does, without torchvision.

    Each frame is resized to the crop size, rescaled and normalised like the base crop of an image;
    returns `pixel_values_videos` (videos, frames, channels, height, width).
    """

    def __init__(self, image_processor: LlavaOnevisionImageProcessorPil) -> None:
        self.image_processor = image_processor

    def __call__(self, videos: list[np.ndarray], **kwargs: object) -> BatchFeature:
        processed = []
        for video in videos:
            frames = self.image_processor(
                [list(video)], image_grid_pinpoints=[[OV_CROP, OV_CROP]], return_tensors="pt"
            )["pixel_values"]
            processed.append(frames[:, 0])  # one "multi-image" sample: every frame is a single crop
        return BatchFeature({"pixel_values_videos": torch.stack(processed)})


class PilOnevisionProcessor(LlavaOnevisionProcessor):
    """The real OneVision processor (placeholder expansion included) with a PIL video processor.

    transformers refuses any video processor when torchvision is absent (its class check looks the
    video processor up in a registry that needs torchvision); the check is skipped for that slot only.
    """

    def check_argument_for_proper_class(self, argument_name: str, argument: object) -> type:
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def make_onevision_processor(padding_side: str = "left") -> PilOnevisionProcessor:
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": OV_CROP, "width": OV_CROP}, image_grid_pinpoints=OV_PINPOINTS
    )
    tokenizer = make_tokenizer(padding_side)
    tokenizer.add_tokens(["<video>"], special_tokens=True)
    assert tokenizer.convert_tokens_to_ids("<video>") == VIDEO_TOKEN_ID
    return PilOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=PilVideoProcessor(image_processor),
        num_image_tokens=(OV_CROP // OV_PATCH) ** 2,
        vision_feature_select_strategy="full",
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio=OV_ASPECT,
    )


def random_video(frames: int = 4, size: int = 120, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8)


def static_video(frames: int = 6, size: int = 120, square: int = 24, seed: int = 0) -> np.ndarray:
    """A fixed textured background with a bright square sliding left to right: mostly static content."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    video = np.repeat(background[None], frames, axis=0)
    for t in range(frames):
        left = t * (size - square) // max(1, frames - 1)
        top = size // 2 - square // 2
        video[t, top : top + square, left : left + square] = (255, 40, 40)
    return video


# --- SmolVLM --------------------------------------------------------------------------------------
# 64 px tiles of 8 px patches (8 x 8 = 64 patches), pixel shuffle 2 -> 16 tokens per tile (a 4 x 4 grid).
# The processor resizes the longest side to 128 px and splits into 64 px tiles: a 300x400 image is a
# 2 x 2 grid + the global image (5 tiles, 80 placeholders); any image is upscaled to 2 x 2 (no image is
# a global image only unless do_image_splitting=False).
SMOL_TILE = 64
SMOL_PATCH = 8
SMOL_SCALE = 2
SMOL_TILE_TOKENS = (SMOL_TILE // SMOL_PATCH // SMOL_SCALE) ** 2
SMOL_LAYOUT = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"] + [
    f"<row_{row}_col_{col}>" for row in range(1, 4) for col in range(1, 4)
]
SMOL_WORDS = [*WORDS, *SMOL_LAYOUT]
SMOL_IMAGE_TOKEN_ID = SMOL_WORDS.index("<image>")


def make_smolvlm(seed: int = 0) -> SmolVLMForConditionalGeneration:
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": SMOL_TILE,
        "patch_size": SMOL_PATCH,
    }
    config = SmolVLMConfig(
        vision_config=vision,
        text_config=tiny_llama_config(len(SMOL_WORDS)).to_dict(),
        image_token_id=SMOL_IMAGE_TOKEN_ID,
        scale_factor=SMOL_SCALE,
    )
    torch.manual_seed(seed)
    return SmolVLMForConditionalGeneration(config).eval()


class SmolVLMImageOnlyProcessor(SmolVLMProcessor):
    """The real SmolVLM processor without its video slot, whose video processor needs torchvision."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_len: int = 169, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, image_seq_len=image_seq_len, chat_template=chat_template)

    def check_argument_for_proper_class(self, argument_name: str, argument: object) -> type:
        if argument_name == "video_processor":
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)


def make_smolvlm_processor(padding_side: str = "left", do_image_splitting: bool = True) -> SmolVLMImageOnlyProcessor:
    tokenizer = word_level_tokenizer(
        SMOL_WORDS,
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
        padding_side=padding_side,
    )
    tokenizer.add_tokens(SMOL_LAYOUT, special_tokens=True)
    image_processor = SmolVLMImageProcessorPil(
        size={"longest_edge": 2 * SMOL_TILE},
        max_image_size={"longest_edge": SMOL_TILE},
        do_image_splitting=do_image_splitting,
    )
    return SmolVLMImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=SMOL_TILE_TOKENS
    )


# --- Mistral 3 ------------------------------------------------------------------------------------
# Pixtral patches of 8 px, 2x2 patch merger: one language-model token per 16 px. Images are resized to
# at most 128 px on the longest side (multiples of 16 px): a 300x400 image is 96x128 px = 12x16 patches
# = 6x8 merged tokens (48 [IMG], 5 [IMG_BREAK], 1 [IMG_END]); 150x200 -> 96x128 too; 40x90 -> 64x128
# (4x8 = 32 tokens). The largest image (128 px square) has 64 merged tokens.
MISTRAL_IMAGE_PX = 128
MISTRAL_PATCH = 8
MISTRAL_MERGE = 2
MISTRAL_LAYOUT = ["[IMG]", "[IMG_BREAK]", "[IMG_END]"]
MISTRAL_WORDS = [*WORDS, *MISTRAL_LAYOUT]
MISTRAL_IMAGE_TOKEN_ID = MISTRAL_WORDS.index("[IMG]")
MISTRAL_BREAK_TOKEN_ID = MISTRAL_WORDS.index("[IMG_BREAK]")
MISTRAL_END_TOKEN_ID = MISTRAL_WORDS.index("[IMG_END]")


def make_mistral3(seed: int = 0) -> Mistral3ForConditionalGeneration:
    vision = {
        "model_type": "pixtral",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "head_dim": 8,
        "image_size": MISTRAL_IMAGE_PX,
        "patch_size": MISTRAL_PATCH,
    }
    text = {
        "model_type": "mistral",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "vocab_size": len(MISTRAL_WORDS),
        "pad_token_id": 0,
        "eos_token_id": 2,
        "bos_token_id": 3,
        "sliding_window": None,
    }
    config = Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=MISTRAL_IMAGE_TOKEN_ID,
        spatial_merge_size=MISTRAL_MERGE,
        vision_feature_layer=-1,
        tie_word_embeddings=False,  # tied, a tiny random model only repeats its last input token
    )
    torch.manual_seed(seed)
    return Mistral3ForConditionalGeneration(config).eval()


def make_mistral3_processor(padding_side: str = "left") -> PixtralPilProcessor:
    tokenizer = word_level_tokenizer(
        MISTRAL_WORDS, extra_special_tokens={"image_token": "[IMG]"}, padding_side=padding_side
    )
    tokenizer.add_tokens(MISTRAL_LAYOUT, special_tokens=True)
    image_processor = PixtralImageProcessorPil(size={"longest_edge": MISTRAL_IMAGE_PX}, patch_size=MISTRAL_PATCH)
    return PixtralPilProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=MISTRAL_PATCH, spatial_merge_size=MISTRAL_MERGE
    )


# --- Gemma 3 ----------------------------------------------------------------------------------------
# SigLIP on 448 px / patch 14 = 32 x 32 patches, average-pooled 4 x 4 (the real kernel: 896 px, 64 x 64
# patches -> 16 x 16) to 8 x 8 = 64 soft tokens per image. Prompts mark an image with "<start_of_image>";
# the processor expands it to "<start_of_image>" + 64 x "<image_soft_token>" + "<end_of_image>".
GEMMA_WORDS = [*WORDS, "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
GEMMA_IMAGE_TOKEN_ID = GEMMA_WORDS.index("<image_soft_token>")
GEMMA_IMAGE = 448
GEMMA_SOFT_TOKENS = 64


def make_gemma3(seed: int = 0) -> Gemma3ForConditionalGeneration:
    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=GEMMA_IMAGE,
        patch_size=14,
        vision_use_head=False,
    )
    text = {
        "vocab_size": len(GEMMA_WORDS),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 32,  # shorter than the prompts: the sliding layer masks what a window excludes
        "layer_types": ["sliding_attention", "full_attention"],
        "pad_token_id": 0,
        "eos_token_id": 2,
        "bos_token_id": 3,
    }
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=GEMMA_SOFT_TOKENS,
        boi_token_index=GEMMA_WORDS.index("<start_of_image>"),
        eoi_token_index=GEMMA_WORDS.index("<end_of_image>"),
        image_token_index=GEMMA_IMAGE_TOKEN_ID,
    )
    torch.manual_seed(seed)
    return Gemma3ForConditionalGeneration(config).eval()


def make_gemma3_processor(padding_side: str = "left") -> Gemma3Processor:
    tokenizer = make_tokenizer(
        padding_side,
        GEMMA_WORDS,
        {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": GEMMA_IMAGE, "width": GEMMA_IMAGE})
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=GEMMA_SOFT_TOKENS)


# --- InternVL ---------------------------------------------------------------------------------------
# InternViT on 224 px tiles / patch 14 = [CLS] + 16 x 16 patches, pixel-shuffled (0.5) to 8 x 8 = 64
# tokens per tile; up to 4 tiles plus a thumbnail per image. Prompts mark an image with "<IMG_CONTEXT>";
# the processor expands it to "<img>" + 64 x tiles "<IMG_CONTEXT>" + "</img>".
INTERNVL_WORDS = [*WORDS, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
INTERNVL_IMAGE_TOKEN_ID = INTERNVL_WORDS.index("<IMG_CONTEXT>")
INTERNVL_TILE = 224
INTERNVL_TILE_TOKENS = 64
INTERNVL_MAX_TILES = 4


def make_internvl(seed: int = 0, **vision_options: object) -> InternVLForConditionalGeneration:
    """`vision_options` override the tower's settings (e.g. use_qk_norm=True, as InternViT-6B has)."""
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "image_size": INTERNVL_TILE,
        "patch_size": 14,
        **vision_options,
    }
    text = {
        "model_type": "qwen2",
        "vocab_size": len(INTERNVL_WORDS),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "pad_token_id": 0,
        "eos_token_id": 2,
        "bos_token_id": 3,
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=INTERNVL_IMAGE_TOKEN_ID,
        image_seq_length=INTERNVL_TILE_TOKENS,
        tie_word_embeddings=False,  # tied tiny random embeddings only ever repeat the last prompt token
    )
    torch.manual_seed(seed)
    return InternVLForConditionalGeneration(config).eval()


def make_internvl_processor(padding_side: str = "left") -> InternVLProcessor:
    """InternVL's processor without its video slot (its video processor needs torchvision)."""
    tokenizer = make_tokenizer(
        padding_side,
        INTERNVL_WORDS,
        {
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": INTERNVL_TILE, "width": INTERNVL_TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=INTERNVL_MAX_TILES,
    )
    processor_class = image_only_processor_class(InternVLProcessor)
    return processor_class(image_processor=image_processor, tokenizer=tokenizer, image_seq_length=INTERNVL_TILE_TOKENS)


# --- the registry of supported families: tests that run on "every family" parametrise over it ---------
def marked_prompt(marker: str) -> Callable[..., str]:
    """Prompts that mark each image with `marker`, the text the family's processor expands."""

    def prompt(images: int, question: str = "what is in the image ?") -> str:
        return "USER: " + f"{marker} " * images + f"{question} ASSISTANT:"

    return prompt


llava_prompt = marked_prompt("<image>")


def qwen_family_prompt(images: int, question: str = "what is in the image ?") -> str:
    return qwen_prompt(*["<image>"] * images, question=question) if images else f"USER: {question} ASSISTANT:"


@dataclass(frozen=True)
class Family:
    """A tiny model of one supported family: how to build it, its processor, and its prompts."""

    make_model: Callable[[], Any]
    make_processor: Callable[..., Any]
    image_token_id: int
    prompt: Callable[..., str]  # (number of images, question) -> one sample's text
    nested_images: bool = False  # the processor takes one list of images per sample
    dropped_tokens: tuple[int, ...] = ()  # layout tokens of an image run that the reduction drops

    def images(self, per_sample: list[list[Any]]) -> Any:
        """The processor's `images` argument for these images of each sample (None when there are none)."""
        if not any(per_sample):
            return None
        return [list(row) for row in per_sample] if self.nested_images else [i for row in per_sample for i in row]


FAMILIES: dict[str, Family] = {
    "llava-1.5": Family(make_llava, make_llava_processor, IMAGE_TOKEN_ID, llava_prompt),
    "llava-next": Family(make_llava_next, make_llava_next_processor, IMAGE_TOKEN_ID, llava_prompt),
    "llava-onevision": Family(make_onevision, make_onevision_processor, IMAGE_TOKEN_ID, llava_prompt),
    "qwen2-vl": Family(make_qwen2_vl, make_qwen_processor, QWEN_IMAGE_TOKEN_ID, qwen_family_prompt),
    "qwen2.5-vl": Family(make_qwen2_5_vl, make_qwen_processor, QWEN_IMAGE_TOKEN_ID, qwen_family_prompt),
    "qwen3-vl": Family(make_qwen3_vl, make_qwen3_processor, QWEN_IMAGE_TOKEN_ID, qwen_family_prompt),
    "qwen3-vl-moe": Family(make_qwen3_vl_moe, make_qwen3_processor, QWEN_IMAGE_TOKEN_ID, qwen_family_prompt),
    "qwen3.5": Family(make_qwen3_5, make_qwen3_processor, QWEN_IMAGE_TOKEN_ID, qwen_family_prompt),
    "qwen3.5-moe": Family(make_qwen3_5_moe, make_qwen3_processor, QWEN_IMAGE_TOKEN_ID, qwen_family_prompt),
    "gemma3": Family(
        make_gemma3, make_gemma3_processor, GEMMA_IMAGE_TOKEN_ID, marked_prompt("<start_of_image>"), nested_images=True
    ),
    "internvl": Family(make_internvl, make_internvl_processor, INTERNVL_IMAGE_TOKEN_ID, marked_prompt("<IMG_CONTEXT>")),
    "smolvlm": Family(
        make_smolvlm, make_smolvlm_processor, SMOL_IMAGE_TOKEN_ID, marked_prompt("<image>"), nested_images=True
    ),
    "mistral3": Family(
        make_mistral3,
        make_mistral3_processor,
        MISTRAL_IMAGE_TOKEN_ID,
        marked_prompt("[IMG]"),
        dropped_tokens=(MISTRAL_BREAK_TOKEN_ID,),
    ),
}
