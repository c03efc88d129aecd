"""Real-size architectures with random weights, for timing without downloading anything.

Each entry is a published configuration (layer counts, widths, heads, vocabulary, image geometry).
Weights are random (speed does not depend on their values): the model is allocated directly in the
requested dtype without running the initialisers, then every parameter is filled by tiling one
small random block, so a 7B model in bfloat16 takes ~14 GB and a few seconds to fill, never an
fp32 copy. The processor pairs the family's PIL image processor with a synthetic word-level
tokenizer that knows the special tokens the model needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Token ids of the synthetic tokenizers; the image token sits where the real checkpoints put it.
_WORDS = ("<unk>", "<s>", "</s>", *"what is shown in the image ? describe it briefly . USER: ASSISTANT:".split())


@dataclass(frozen=True)
class ArchSpec:
    """A published architecture: how to build it and which budgets (tokens per image) to measure."""

    name: str
    description: str
    build_config: Callable[[], Any]
    build_processor: Callable[[Any], Any]  # config -> processor
    budgets: tuple[int, ...] = (192, 128, 64)  # tokens per image, or per crop for AnyRes models
    image_size: int = 336  # side of the square benchmark image


def synthetic_tokenizer(special: dict[str, int], pad_token: str, extra_special: dict[str, str] | None = None) -> Any:
    """Word-level tokenizer over a few words plus `special` tokens at fixed ids (`pad_token` among them)."""
    from vlmzip.synthetic import word_level_tokenizer

    vocab = {word: index for index, word in enumerate(_WORDS)}
    vocab.update(special)
    return word_level_tokenizer(vocab, pad_token=pad_token, extra_special_tokens=extra_special)


def _clip_l_336() -> Any:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(  # CLIP ViT-L/14 at 336 px
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )


def _vicuna_7b(max_positions: int = 4096) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(  # Llama-2-7B (vicuna-7b-v1.5) with LLaVA's extended vocabulary
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        pad_token_id=32001,
        bos_token_id=1,
        eos_token_id=2,
    )


def _llava_settings() -> dict[str, Any]:
    """What LLaVA-1.5-7B and LLaVA-NeXT-7B (vicuna) share: tower, language model, projector, image token."""
    return {
        "vision_config": _clip_l_336(),
        "text_config": _vicuna_7b(),
        "image_token_id": 32000,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": 576,
        "tie_word_embeddings": False,
    }


def _llava_15_7b_config() -> Any:
    from transformers import LlavaConfig

    return LlavaConfig(**_llava_settings())


def _llava_style_processor(config: Any, processor_class: type, image_processor_class: type, **image: Any) -> Any:
    """A LLaVA(-NeXT) processor: the PIL image processor with CLIP's normalisation, `<image>` placeholders."""
    from vlmzip.synthetic import llava_style_processor

    tokenizer = synthetic_tokenizer(
        {"<image>": config.image_token_id, "<pad>": config.text_config.pad_token_id},
        "<pad>",
        {"image_token": "<image>"},
    )
    return llava_style_processor(
        processor_class,
        image_processor_class,
        tokenizer,
        image_size=config.vision_config.image_size,
        patch_size=config.vision_config.patch_size,
        strategy=config.vision_feature_select_strategy,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        **image,
    )


def _llava_15_processor(config: Any) -> Any:
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return _llava_style_processor(config, LlavaProcessor, CLIPImageProcessorPil)


# LLaVA-NeXT's AnyRes grid: a 672x672 image becomes the base crop plus 2x2 crops of 336 px.
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


def _llava_next_7b_config() -> Any:
    from transformers import LlavaNextConfig

    return LlavaNextConfig(**_llava_settings(), image_grid_pinpoints=NEXT_PINPOINTS)


def _llava_next_processor(config: Any) -> Any:
    from transformers import LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    grid = {"image_grid_pinpoints": config.image_grid_pinpoints}
    return _llava_style_processor(config, LlavaNextProcessor, LlavaNextImageProcessorPil, **grid)


# Qwen2-VL's special tokens, at the ids of the released checkpoints.
QWEN_TOKENS = {
    "<|endoftext|>": 151643,
    "<|im_end|>": 151645,
    "<|vision_start|>": 151652,
    "<|vision_end|>": 151653,
    "<|image_pad|>": 151655,
    "<|video_pad|>": 151656,
}


def _qwen2_vl_2b_config() -> Any:
    from transformers import Qwen2VLConfig

    vision = {  # the 675M-parameter ViT with 2x2 patch merging to the language model's width
        "depth": 32,
        "embed_dim": 1280,
        "hidden_size": 1536,
        "num_heads": 16,
        "mlp_ratio": 4,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    text = {  # Qwen2-1.5B
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "pad_token_id": QWEN_TOKENS["<|endoftext|>"],
        "eos_token_id": QWEN_TOKENS["<|im_end|>"],
        "bos_token_id": QWEN_TOKENS["<|endoftext|>"],
        "tie_word_embeddings": True,
    }
    return Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=QWEN_TOKENS["<|image_pad|>"],
        video_token_id=QWEN_TOKENS["<|video_pad|>"],
        vision_start_token_id=QWEN_TOKENS["<|vision_start|>"],
        vision_end_token_id=QWEN_TOKENS["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _qwen_token_ids() -> dict[str, int]:
    return {
        "image_token_id": QWEN_TOKENS["<|image_pad|>"],
        "video_token_id": QWEN_TOKENS["<|video_pad|>"],
        "vision_start_token_id": QWEN_TOKENS["<|vision_start|>"],
        "vision_end_token_id": QWEN_TOKENS["<|vision_end|>"],
    }


def _qwen2_5_vl_7b_config() -> Any:
    from transformers import Qwen2_5_VLConfig

    vision = {  # the 670M-parameter ViT with window attention, 4 full-attention blocks, SwiGLU MLP
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "out_hidden_size": 3584,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [7, 15, 23, 31],
        "hidden_act": "silu",
    }
    text = {  # Qwen2-7B
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "vocab_size": 152064,
        "max_position_embeddings": 128000,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        "pad_token_id": QWEN_TOKENS["<|endoftext|>"],
        "eos_token_id": QWEN_TOKENS["<|im_end|>"],
        "bos_token_id": QWEN_TOKENS["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    return Qwen2_5_VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **_qwen_token_ids())


def _qwen3_vl_8b_config() -> Any:
    from transformers import Qwen3VLConfig

    vision = {  # the 27-block, 1152-wide SigLIP-2-shaped ViT, patch 16, deepstack after blocks 8, 16, 24
        "depth": 27,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_heads": 16,
        "out_hidden_size": 4096,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [8, 16, 24],
        "hidden_act": "gelu_pytorch_tanh",
    }
    text = {  # Qwen3-8B
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 151936,
        "max_position_embeddings": 262144,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [24, 20, 20],
            "mrope_interleaved": True,
        },
        "pad_token_id": QWEN_TOKENS["<|endoftext|>"],
        "eos_token_id": QWEN_TOKENS["<|im_end|>"],
        "bos_token_id": QWEN_TOKENS["<|endoftext|>"],
        "tie_word_embeddings": False,
    }
    return Qwen3VLConfig(vision_config=vision, text_config=text, tie_word_embeddings=False, **_qwen_token_ids())


def _qwen_processor(processor_class: type, **image: Any) -> Any:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from vlmzip.loading import image_only_processor_class  # the video slot would need torchvision

    tokenizer = synthetic_tokenizer(
        QWEN_TOKENS,
        "<|endoftext|>",
        {
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
    )
    image_processor = Qwen2VLImageProcessorPil(**image)
    return image_only_processor_class(processor_class)(image_processor=image_processor, tokenizer=tokenizer)


def _qwen2_vl_processor(config: Any) -> Any:
    from transformers import Qwen2VLProcessor

    return _qwen_processor(Qwen2VLProcessor, min_pixels=56 * 56, max_pixels=28 * 28 * 1280)


def _qwen3_vl_processor(config: Any) -> Any:
    from transformers import Qwen3VLProcessor

    half = [0.5, 0.5, 0.5]  # Qwen3-VL normalises to [-1, 1]
    return _qwen_processor(
        Qwen3VLProcessor,
        patch_size=16,
        merge_size=2,
        min_pixels=64 * 64,
        max_pixels=32 * 32 * 1280,
        image_mean=half,
        image_std=half,
    )


ARCHS: dict[str, ArchSpec] = {
    "llava-1.5-7b": ArchSpec(
        "llava-1.5-7b",
        "LLaVA-1.5-7B: CLIP ViT-L/14-336 (576 tokens per image) + Llama-2-7B-shaped language model",
        _llava_15_7b_config,
        _llava_15_processor,
    ),
    "llava-next-7b": ArchSpec(
        "llava-next-7b",
        "LLaVA-NeXT-7B (vicuna): CLIP ViT-L/14-336 on a 672 px image = base + 2x2 crops (2,928 tokens)",
        _llava_next_7b_config,
        _llava_next_processor,
        budgets=(128, 64, 32),  # per crop: 640 / 320 / 160 per image, the paper's settings
        image_size=672,
    ),
    "qwen2-vl-2b": ArchSpec(
        "qwen2-vl-2b",
        "Qwen2-VL-2B: 675M ViT (2x2 merge) on a 672 px image (576 merged tokens) + Qwen2-1.5B; M-RoPE, no FastV",
        _qwen2_vl_2b_config,
        _qwen2_vl_processor,
        image_size=672,
    ),
    # Budgets: 25 % and 12.5 % of the image's 576 merged tokens.
    "qwen2.5-vl-7b": ArchSpec(
        "qwen2.5-vl-7b",
        "Qwen2.5-VL-7B: 670M windowed ViT on a 672 px image (2,304 patches, 576 merged tokens) + Qwen2-7B; M-RoPE",
        _qwen2_5_vl_7b_config,
        _qwen2_vl_processor,
        budgets=(144, 72),
        image_size=672,
    ),
    "qwen3-vl-8b": ArchSpec(
        "qwen3-vl-8b",
        "Qwen3-VL-8B: 27-block ViT (patch 16, deepstack) on a 768 px image (2,304 patches, 576 merged tokens) "
        "+ Qwen3-8B; M-RoPE",
        _qwen3_vl_8b_config,
        _qwen3_vl_processor,
        budgets=(144, 72),
        image_size=768,
    ),
}


def available_archs() -> list[str]:
    return sorted(ARCHS)


def _fill_random(model: nn.Module, seed: int = 0, block: int = 1 << 20) -> None:
    """Give every parameter plausible values cheaply: norms 1, biases 0, the rest a tiled N(0, 0.02) block."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(block, generator=generator) * 0.02
    converted: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}  # converting per parameter is slow
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and name.endswith("weight"):
                parameter.fill_(1.0)
            elif name.endswith("bias"):
                parameter.zero_()
            else:
                flat = parameter.view(-1)
                key = (flat.device, flat.dtype)
                if key not in converted:
                    converted[key] = noise.to(device=flat.device, dtype=flat.dtype)
                source = converted[key]
                whole = flat.numel() // block * block
                # One broadcast copy for the bulk: a Python loop over blocks is several times slower.
                flat[:whole].view(-1, block).copy_(source.expand(whole // block, block))
                flat[whole:] = source[: flat.numel() - whole]


def share_layer_weights(model: nn.Module) -> int:
    """Make every layer of each stack of identical layers (tower blocks, decoder layers) use the first
    layer's parameters; returns how many parameters are no longer stored.

    Call before any parameter is written: the dropped layers' storage was never touched, so it is
    returned without ever becoming resident. Compute is unchanged (every layer still runs, on weights
    of the same shapes); a layer's weights (tens to hundreds of MB) far exceed CPU caches, so each
    layer still streams them from memory. What changes is the resident size: a 7B model fits in ~3 GB.
    """
    saved = 0
    for stack in model.modules():
        if not isinstance(stack, nn.ModuleList) or len(stack) < 2:
            continue
        first = dict(stack[0].named_parameters())
        for layer in stack[1:]:
            if type(layer) is not type(stack[0]):
                continue
            own = dict(layer.named_parameters())
            if own.keys() != first.keys() or any(own[k].shape != first[k].shape for k in own):
                continue
            for module_name, module in layer.named_modules():
                for parameter_name, parameter in list(module._parameters.items()):
                    if parameter is None:
                        continue
                    key = f"{module_name}.{parameter_name}" if module_name else parameter_name
                    saved += module._parameters[parameter_name].numel()
                    module._parameters[parameter_name] = first[key]
    return saved


def _check_arch(name: str, dtype: object) -> None:
    if name not in ARCHS:
        raise ValueError(f"arch must be one of {available_archs()}, got {name!r}")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")


def build_arch(
    name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu", *, shared_layers: bool = False
) -> tuple[Any, Any]:
    """(model, processor) of a table architecture with random weights, in `dtype` on `device`.

    shared_layers: identical layers share one set of weights (`share_layer_weights`), for machines
    without the memory of the whole model; speed and FLOPs are those of the real size.
    """
    _check_arch(name, dtype)
    from transformers import AutoModelForImageTextToText
    from transformers.initialization import no_init_weights

    spec = ARCHS[name]
    config = spec.build_config()
    with torch.device(device), no_init_weights():
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.tie_weights()  # skipped with the initialisers; matters for tied heads (Qwen2-VL)
    if shared_layers:
        share_layer_weights(model)
    _fill_random(model)
    model.eval()
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model, spec.build_processor(config)


def build_arch_tower(
    name: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu"
) -> tuple[Any, Any]:
    """(vision tower, processor) of a table architecture: its tower alone, with random weights as in `build_arch`."""
    _check_arch(name, dtype)
    from transformers import AutoModel
    from transformers.initialization import no_init_weights

    spec = ARCHS[name]
    config = spec.build_config()
    vision_config = getattr(config, "vision_config", None)
    if vision_config is None:
        raise ValueError(f"arch {name!r} has no separate vision config")
    with torch.device(device), no_init_weights():
        tower = AutoModel.from_config(vision_config, dtype=dtype)
    _fill_random(tower)
    return tower.eval(), spec.build_processor(config)
