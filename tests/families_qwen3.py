"""Tiny random-initialised Qwen3-VL (+ MoE), Qwen3.5 (+ MoE) models and their processor.

Real transformers classes with small widths; the processor caps images at a few hundred merged tokens.
"""

from __future__ import annotations

import torch

from conftest import make_tokenizer

# --- Qwen3-VL (+ MoE) and Qwen3.5 ------------------------------------------------------------------
# Patch 16 with 2x2 merging: a 300x400 image becomes 12x16 patches (48 merged tokens) at the
# processor's 224x224 pixel cap, like the Qwen2-VL fixtures; 150x200 becomes 10x12 (30).
QWEN3_PATCH = 16
QWEN3_PATCH_FEATURES = 3 * 2 * QWEN3_PATCH * QWEN3_PATCH  # channels x temporal patch x patch x patch
QWEN3_DEEPSTACK = [0, 1]  # blocks whose outputs feed deepstack mergers (the tiny tower has 3)


def _qwen3_vision(**extra: object) -> dict:
    return {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 64,
        "patch_size": QWEN3_PATCH,
        "num_position_embeddings": 64,  # an 8x8 learned grid, resampled to every image's grid
        **extra,
    }


def _qwen3_text(**extra: object) -> dict:
    from conftest import _qwen_text_config

    text = _qwen_text_config()
    text["head_dim"] = 16
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [2, 3, 3],
        "mrope_interleaved": True,
    }
    text.update(extra)
    return text


def make_qwen3_vl(seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from conftest import _qwen_token_ids

    config = Qwen3VLConfig(
        text_config=_qwen3_text(),
        vision_config=_qwen3_vision(deepstack_visual_indexes=QWEN3_DEEPSTACK),
        **_qwen_token_ids(),
    )
    torch.manual_seed(seed)
    return Qwen3VLForConditionalGeneration(config).eval()


def make_qwen3_vl_moe(seed: int = 0):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from conftest import _qwen_token_ids

    text = _qwen3_text(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    config = Qwen3VLMoeConfig(
        text_config=text, vision_config=_qwen3_vision(deepstack_visual_indexes=QWEN3_DEEPSTACK), **_qwen_token_ids()
    )
    torch.manual_seed(seed)
    return Qwen3VLMoeForConditionalGeneration(config).eval()


def _qwen3_5_text(**extra: object) -> dict:
    """Qwen3.5's text config: linear attention then full attention, partial rotary M-RoPE."""
    text = _qwen3_text(
        layer_types=["linear_attention", "full_attention"],
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        **extra,
    )
    text["rope_parameters"] = {**text["rope_parameters"], "partial_rotary_factor": 0.5, "mrope_section": [1, 1, 2]}
    return text


def make_qwen3_5(seed: int = 0):
    """Qwen3.5: one Gated DeltaNet layer then one full-attention layer (the default layout has no
    full-attention layer at 2 layers); rotary on half of each 16-wide head (the default quarter would
    leave 4 dimensions for an 8-dimension M-RoPE section)."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from conftest import _qwen_token_ids

    config = Qwen3_5Config(text_config=_qwen3_5_text(), vision_config=_qwen3_vision(), **_qwen_token_ids())
    torch.manual_seed(seed)
    return Qwen3_5ForConditionalGeneration(config).eval()


def make_qwen3_5_moe(seed: int = 0):
    """Qwen3.5-MoE: the Qwen3.5 fixture's layout with 4 experts (2 per token) and a shared expert."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from conftest import _qwen_token_ids

    text = _qwen3_5_text(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=32
    )
    config = Qwen3_5MoeConfig(text_config=text, vision_config=_qwen3_vision(), **_qwen_token_ids())
    torch.manual_seed(seed)
    return Qwen3_5MoeForConditionalGeneration(config).eval()


def make_qwen3_processor(padding_side: str = "left", max_pixels: int = 224 * 224):
    """Qwen3-VL's processor (also Qwen3.5's) without its video slot, which needs torchvision."""
    from transformers import Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from conftest import QWEN_WORDS
    from vlmzip.loading import image_only_processor_class

    special = {
        "image_token": "<image>",
        "video_token": "<video>",
        "vision_start_token": "<vision_start>",
        "vision_end_token": "<vision_end>",
    }
    tokenizer = make_tokenizer(padding_side, QWEN_WORDS, special)
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=QWEN3_PATCH,
        merge_size=2,
        min_pixels=64 * 64,
        max_pixels=max_pixels,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return image_only_processor_class(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tokenizer)
