"""One adapter per model family; `adapter_for(model)` picks it by the model's class."""

from __future__ import annotations

from torch import nn

from vlmzip.adapters.base import Adapter
from vlmzip.adapters.llava import LlavaAdapter
from vlmzip.adapters.llava_next import LlavaNextAdapter
from vlmzip.adapters.llava_onevision import LlavaOnevisionAdapter
from vlmzip.adapters.mistral3 import Mistral3Adapter
from vlmzip.adapters.qwen2_vl import Qwen2VLAdapter
from vlmzip.adapters.smolvlm import SmolVLMAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    SmolVLMAdapter,
    Mistral3Adapter,
)


def supported_families() -> list[str]:
    return sorted(family for adapter in ADAPTERS for family in adapter.families)


def adapter_class_for(model: nn.Module) -> type[Adapter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a transformers model (nn.Module), got {type(model).__name__}")
    name = type(model).__name__
    for adapter in ADAPTERS:
        if name in adapter.families:
            return adapter
    raise ValueError(f"model: unsupported model family {name}; supported: {supported_families()}")


__all__ = ["ADAPTERS", "Adapter", "adapter_class_for", "supported_families"]
