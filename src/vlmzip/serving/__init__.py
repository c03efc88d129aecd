"""Serving VisionZip with vLLM.

`register()` is the `vllm.general_plugins` entry point: vLLM calls it in every process it starts,
and it registers the plugin's model classes lazily (by import path), so that a model module, and
vLLM's model code with it, is imported only when a model directory names that architecture.
`vlmzip export` writes such directories:

- `VisionZipLlavaForConditionalGeneration` (`vlmzip.serving.vllm`): LLaVA-1.5 with a CLIP tower;
- `VisionZipQwen2_5_VLForConditionalGeneration` (`vlmzip.serving.qwen`): Qwen2.5-VL, images and videos.
"""

from __future__ import annotations

from vlmzip.serving.settings import ARCHITECTURE, PLUGIN_MODULES

MODEL_PATH = f"{PLUGIN_MODULES[ARCHITECTURE]}:{ARCHITECTURE}"
MODEL_PATHS = {architecture: f"{module}:{architecture}" for architecture, module in PLUGIN_MODULES.items()}


def register() -> None:
    """Register the VisionZip model classes with vLLM's model registry (safe to call repeatedly)."""
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, path in MODEL_PATHS.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, path)


__all__ = ["ARCHITECTURE", "MODEL_PATH", "MODEL_PATHS", "register"]
