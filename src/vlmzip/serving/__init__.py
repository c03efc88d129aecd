"""Serving VisionZip with vLLM.

`register()` is the `vllm.general_plugins` entry point: vLLM calls it in every process it starts,
and it registers `VisionZipLlavaForConditionalGeneration` lazily (by import path), so that the model
module, and vLLM's model code with it, is imported only when a model directory names that
architecture. `vlmzip export` writes such directories.
"""

from __future__ import annotations

from vlmzip.serving.settings import ARCHITECTURE

MODEL_PATH = f"vlmzip.serving.vllm:{ARCHITECTURE}"


def register() -> None:
    """Register the VisionZip model classes with vLLM's model registry (safe to call repeatedly)."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_PATH)


__all__ = ["ARCHITECTURE", "MODEL_PATH", "register"]
