"""One adapter per model family; `adapter_class_for(model)` picks it by the model's class, and
`geometry_of(model)` describes the family's tower and token counts without a budget."""

from __future__ import annotations

from typing import Any

from torch import nn

from vlmzip.adapters.base import Adapter, FamilyGeometry
from vlmzip.adapters.gemma3 import Gemma3Adapter
from vlmzip.adapters.internvl import InternVLAdapter
from vlmzip.adapters.llava import LlavaAdapter
from vlmzip.adapters.llava_next import LlavaNextAdapter
from vlmzip.adapters.llava_onevision import LlavaOnevisionAdapter
from vlmzip.adapters.mistral3 import Mistral3Adapter
from vlmzip.adapters.qwen2_vl import Qwen2VLAdapter
from vlmzip.adapters.qwen3_5 import Qwen3_5Adapter
from vlmzip.adapters.qwen3_vl import Qwen3VLAdapter
from vlmzip.adapters.smolvlm import SmolVLMAdapter

ADAPTERS: tuple[type[Adapter], ...] = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen3VLAdapter,
    Qwen3_5Adapter,
    Gemma3Adapter,
    InternVLAdapter,
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


def check_supported(model: nn.Module) -> None:
    """Raise the error `adapter_class_for` raises for a model no family handles (TypeError, ValueError)."""
    adapter_class_for(model)


def geometry_of(model: nn.Module, processor: Any = None) -> FamilyGeometry:
    """The config-free description of `model`'s family: vision tower, projector, feature layer, placeholder
    ids, token counts per image / crop (at `processor`'s input size where given, else at the model's own
    directory's processor or the tower config's size), and whether the placeholders leave out [CLS].

    Raises the unsupported-model error of `adapter_class_for` (and a family's own refusal of a model
    configuration it cannot handle).
    """
    return adapter_class_for(model).geometry(model, processor)


__all__ = [
    "ADAPTERS",
    "Adapter",
    "FamilyGeometry",
    "adapter_class_for",
    "check_supported",
    "geometry_of",
    "supported_families",
]
