"""A tiny random-weight LLaVA-1.5 directory (CLIP 336/14 tower, Llama LM) that vLLM and transformers both load.

For tests and the serving benchmark: nothing is downloaded. The directory holds the model, a
word-level tokenizer with a chat template, and a LLaVA processor naming the PIL image processor (so
that it loads with or without torchvision). Its weights are in transformers' own saved layout;
`vlmzip export` turns it into a directory vLLM serves.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from vlmzip.config import check_int
from vlmzip.synthetic import (
    llava_style_processor,
    tiny_clip_vision_config,
    tiny_llama_config,
    tiny_qwen2_5_vision_config,
    word_level_tokenizer,
)

VOCABULARY = (
    "<pad> <unk> </s> <s> <image> USER: ASSISTANT: what is in the image ? a an cat dog bird car red green blue "
    "yellow black white how many are there left right of above below shape color circle square triangle star "
    "one two three four five six yes no big small it this picture describe"
).split()
IMAGE_TOKEN = "<image>"
# One word per whitespace-separated piece, like the tokenizer: "USER: <image> what is ? ASSISTANT:".
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }} "
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% elif part['type'] == 'text' %}{{ part['text'] }} {% endif %}"
    "{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Word-level tokenizer over VOCABULARY (whitespace split, no BOS added), left padding."""
    return word_level_tokenizer(
        VOCABULARY, extra_special_tokens={"image_token": IMAGE_TOKEN}, chat_template=CHAT_TEMPLATE
    )


def build_tiny_llava(
    out_dir: str | os.PathLike[str],
    *,
    text_hidden: int = 64,
    text_layers: int = 2,
    vision_hidden: int = 32,
    vision_layers: int = 4,
    init_range: float = 0.02,
    seed: int = 0,
) -> Path:
    """Save a random LLaVA-1.5-shaped model with tokenizer and processor to `out_dir`; return the path.

    `init_range` is the weights' initialiser std: larger values spread the logits, so greedy
    decoding has no near-ties and implementations agree token for token.
    """
    text_hidden = check_int("text_hidden", text_hidden, 32)
    vision_hidden = check_int("vision_hidden", vision_hidden, 8)
    text_layers = check_int("text_layers", text_layers, 1)
    vision_layers = check_int("vision_layers", vision_layers, 2)  # LLaVA reads layer -2
    # vLLM's CPU attention needs a head size of at least 32: the language model uses exactly 32.
    if text_hidden % 32 or vision_hidden % 4:
        raise ValueError(
            f"text_hidden must be a multiple of 32 and vision_hidden of 4 (their head sizes), got {text_hidden}, "
            f"{vision_hidden}"
        )
    if not isinstance(init_range, (int, float)) or not init_range > 0:
        raise ValueError(f"init_range must be a positive number, got {init_range!r}")
    vision_config = tiny_clip_vision_config(
        hidden_size=vision_hidden, layers=vision_layers, heads=4, initializer_range=init_range
    )
    text_config = tiny_llama_config(
        len(VOCABULARY),
        hidden_size=text_hidden,
        layers=text_layers,
        heads=text_hidden // 32,
        kv_heads=max(1, text_hidden // 64),
        max_position_embeddings=4096,
        initializer_range=init_range,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=VOCABULARY.index(IMAGE_TOKEN),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        initializer_range=init_range,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = llava_style_processor(
        LlavaProcessor, CLIPImageProcessorPil, make_tokenizer(), chat_template=CHAT_TEMPLATE
    )
    return _save(out_dir, model, processor)


# --- Qwen2.5-VL ----------------------------------------------------------------------------------
QWEN_VOCABULARY = [*VOCABULARY, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>"]
QWEN_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<image> ", "<|vision_start|> <|image_pad|> <|vision_end|> ").replace(
    "{% elif part['type'] == 'text' %}",
    "{% elif part['type'] == 'video' %}<|vision_start|> <|video_pad|> <|vision_end|> {% elif part['type'] == 'text' %}",
)


def build_tiny_qwen2_5_vl(
    out_dir: str | os.PathLike[str],
    *,
    init_range: float = 0.2,
    seed: int = 0,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
) -> Path:
    """Save a random Qwen2.5-VL (3-block windowed tower, 2-layer Qwen2 LM) with tokenizer and processor.

    The language model's head size is 32 (vLLM's CPU attention needs 32 or more) and its
    `mrope_section` sums to 16. The processor names the PIL image processor; its video processor is
    saved where torchvision is importable (vLLM's environment), which Qwen's video input needs.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text_config = _qwen_text_config(
        init_range, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    )
    vision_config = tiny_qwen2_5_vision_config(initializer_range=init_range)
    model = _qwen_model(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        seed,
        text_config=text_config,
        vision_config=vision_config,
        initializer_range=init_range,
    )
    tokenizer = _qwen_tokenizer(vision_markers=False)
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)

    def video_processor() -> Any:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        return Qwen2VLVideoProcessor(min_pixels=min_pixels, max_pixels=max_pixels)

    return _save(out_dir, model, _qwen_processor(Qwen2_5_VLProcessor, tokenizer, image_processor, video_processor))


# --- Qwen3-VL ------------------------------------------------------------------------------------
def build_tiny_qwen3_vl(
    out_dir: str | os.PathLike[str],
    *,
    init_range: float = 0.2,
    seed: int = 0,
    min_pixels: int = 64 * 64,
    max_pixels: int = 224 * 224,
) -> Path:
    """Save a random Qwen3-VL (3-block tower, patch 16, deepstack after blocks 0 and 1; 2-layer Qwen3 LM).

    The language model's head size is 32 (vLLM's CPU attention) and its interleaved `mrope_section`
    sums to 16; the deepstack features are added to its two layers. The processor names the PIL
    image processor; its video processor is saved where torchvision is importable (vLLM's environment).
    """
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    text_config = _qwen_text_config(
        init_range,
        head_dim=32,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [6, 5, 5],
            "mrope_interleaved": True,
        },
        tie_word_embeddings=False,
    )
    vision_config = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "out_hidden_size": 64,
        "patch_size": 16,
        "num_position_embeddings": 64,
        "deepstack_visual_indexes": [0, 1],
        "initializer_range": init_range,
    }
    model = _qwen_model(
        Qwen3VLConfig, Qwen3VLForConditionalGeneration, seed, text_config=text_config, vision_config=vision_config
    )
    tokenizer = _qwen_tokenizer(vision_markers=True)
    half = {"image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "patch_size": 16, "merge_size": 2}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels, **half)

    def video_processor() -> Any:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

        return Qwen3VLVideoProcessor(size={"shortest_edge": min_pixels, "longest_edge": max_pixels * 2}, **half)

    return _save(out_dir, model, _qwen_processor(Qwen3VLProcessor, tokenizer, image_processor, video_processor))


def _qwen_text_config(init_range: float, **extra: Any) -> dict[str, Any]:
    """The tiny Qwen language model of the Qwen builders: 2 layers, width 64, the QWEN_VOCABULARY."""
    if not isinstance(init_range, (int, float)) or not init_range > 0:
        raise ValueError(f"init_range must be a positive number, got {init_range!r}")
    return {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": len(QWEN_VOCABULARY),
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "eos_token_id": 2,
        "bos_token_id": 3,
        "initializer_range": init_range,
        **extra,
    }


def _qwen_model(config_class: type, model_class: type, seed: int, **config: Any) -> Any:
    """A Qwen model of QWEN_VOCABULARY's special ids, untied embeddings, weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return model_class(config_class(**config, **_qwen_special_ids(), tie_word_embeddings=False)).eval()


def _qwen_tokenizer(*, vision_markers: bool) -> Any:
    """The word-level tokenizer of QWEN_VOCABULARY; ``vision_markers`` also names the vision start/end
    tokens (Qwen3-VL's processor looks them up)."""
    special = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"}
    if vision_markers:
        special |= {"vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}
    return word_level_tokenizer(QWEN_VOCABULARY, extra_special_tokens=special, chat_template=QWEN_CHAT_TEMPLATE)


def _qwen_processor(
    processor_class: type, tokenizer: Any, image_processor: Any, video_processor: Callable[[], Any]
) -> Any:
    """A Qwen processor with the PIL image processor, and the video processor where torchvision is importable
    (vLLM's environment; Qwen's video processors need it); without torchvision an images-only processor."""
    from transformers.utils import is_torchvision_available

    from vlmzip.loading import image_only_processor_class

    parts: dict[str, Any] = {"image_processor": image_processor, "tokenizer": tokenizer}
    if is_torchvision_available():
        parts["video_processor"] = video_processor()
    else:
        processor_class = image_only_processor_class(processor_class)
    return processor_class(chat_template=QWEN_CHAT_TEMPLATE, **parts)


def _qwen_special_ids() -> dict[str, int]:
    """The image, video and vision start/end token ids of QWEN_VOCABULARY, as Qwen configs name them."""
    words = {"image": "<|image_pad|>", "video": "<|video_pad|>", "vision_start": "<|vision_start|>"}
    words["vision_end"] = "<|vision_end|>"
    return {f"{name}_token_id": QWEN_VOCABULARY.index(word) for name, word in words.items()}


def _save(out_dir: str | os.PathLike[str], model: Any, processor: Any) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out
