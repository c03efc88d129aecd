"""Synthetic tokenizers, LLaVA-style processors and tiny model configurations, built without downloading anything.

One place for the pieces that the benchmark architectures (`vlmzip.bench.arch`), the tiny serving
model (`vlmzip.serving.tiny`) and the test suite all build: a word-level tokenizer over a fixed
vocabulary, a LLaVA(-NeXT) processor around a PIL image processor, and small CLIP / Llama / Qwen2.5-VL configs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import CLIPVisionConfig, LlamaConfig, PreTrainedTokenizerFast

from vlmzip.config import check_int

# Token ids shared by the tiny language models and their tokenizers.
PAD_TOKEN_ID, EOS_TOKEN_ID, BOS_TOKEN_ID = 0, 2, 3


def word_level_tokenizer(
    vocabulary: Sequence[str] | Mapping[str, int],
    *,
    pad_token: str = "<pad>",
    extra_special_tokens: Mapping[str, str] | None = None,
    padding_side: str = "left",
    chat_template: str | None = None,
) -> PreTrainedTokenizerFast:
    """Whitespace-split word-level tokenizer; words in a sequence get their position as id.

    `vocabulary` must hold "<unk>", "<s>", "</s>" and `pad_token`; no BOS is added when encoding.
    """
    if isinstance(vocabulary, Mapping):
        vocab = dict(vocabulary)
    elif isinstance(vocabulary, Sequence) and not isinstance(vocabulary, str):
        vocab = {word: index for index, word in enumerate(vocabulary)}
    else:
        raise TypeError(f"vocabulary must be a sequence of words or a word -> id mapping, got {vocabulary!r}")
    missing = [word for word in ("<unk>", "<s>", "</s>", pad_token) if word not in vocab]
    if missing:
        raise ValueError(f"vocabulary must contain {missing}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Passed only when given: an explicit None is saved as `"chat_template": null`.
    template = {} if chat_template is None else {"chat_template": chat_template}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad_token,
        unk_token="<unk>",
        eos_token="</s>",
        bos_token="<s>",
        extra_special_tokens=dict(extra_special_tokens or {}),
        padding_side=padding_side,
        **template,
    )


def llava_style_processor(
    processor_class: type,
    image_processor_class: type,
    tokenizer: Any,
    *,
    image_size: int = 336,
    patch_size: int = 14,
    strategy: str = "default",
    chat_template: str | None = None,
    **image_options: Any,
) -> Any:
    """A LLaVA(-NeXT) processor: square `image_size` crops, "<image>" placeholders, one [CLS] per crop.

    `image_options` go to the image processor (normalisation, AnyRes grid pinpoints, ...).
    """
    image_size = check_int("image_size", image_size, 1)
    patch_size = check_int("patch_size", patch_size, 1)
    if strategy not in ("default", "full"):
        raise ValueError(f"strategy must be 'default' or 'full', got {strategy!r}")
    image_processor = image_processor_class(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        **image_options,
    )
    return processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=chat_template,
    )


def _transformer_sizes(hidden_size: int, layers: int, heads: int) -> dict[str, int]:
    """The checked width, depth and heads of a transformer config, its MLP twice as wide."""
    hidden_size = check_int("hidden_size", hidden_size, 1)
    return {
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": check_int("layers", layers, 1),
        "num_attention_heads": check_int("heads", heads, 1),
    }


def tiny_clip_vision_config(
    *,
    hidden_size: int = 32,
    layers: int = 4,
    heads: int = 4,
    image_size: int = 336,
    patch_size: int = 14,
    **options: Any,
) -> CLIPVisionConfig:
    """A small CLIP vision tower (MLP twice as wide, projection as wide as the tower); `options` pass through."""
    sizes = _transformer_sizes(hidden_size, layers, heads)
    return CLIPVisionConfig(
        **sizes,
        image_size=check_int("image_size", image_size, 1),
        patch_size=check_int("patch_size", patch_size, 1),
        projection_dim=sizes["hidden_size"],
        **options,
    )


def tiny_llama_config(
    vocab_size: int,
    *,
    hidden_size: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    **options: Any,
) -> LlamaConfig:
    """A small Llama language model (MLP twice as wide) with the synthetic tokenizers' pad / EOS / BOS ids."""
    return LlamaConfig(
        **_transformer_sizes(hidden_size, layers, heads),
        num_key_value_heads=check_int("kv_heads", kv_heads, 1),
        vocab_size=check_int("vocab_size", vocab_size, BOS_TOKEN_ID + 1),
        pad_token_id=PAD_TOKEN_ID,
        eos_token_id=EOS_TOKEN_ID,
        bos_token_id=BOS_TOKEN_ID,
        **options,
    )


def tiny_qwen2_5_vision_config(**options: Any) -> dict[str, Any]:
    """A small Qwen2.5-VL vision tower as a config dict: 3 blocks, window attention over 2x2 merged tokens
    (56 px windows), block 1 the last full-attention one, block 2 windowed; `options` override or add keys."""
    return {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "out_hidden_size": 64,
        "num_heads": 4,
        "patch_size": 14,
        "window_size": 56,
        "fullatt_block_indexes": [1],
        **options,
    }
