"""Serving VisionZip with vLLM.

`register()` is the `vllm.general_plugins` entry point: vLLM calls it in every process it starts,
and it registers the plugin's model classes lazily (by import path), so that a model module, and
vLLM's model code with it, is imported only when a model directory names that architecture.
`vlmzip export` writes such directories:

- `VisionZipLlavaForConditionalGeneration` (`vlmzip.serving.vllm`): LLaVA-1.5 with a CLIP tower;
- `VisionZipQwen2_5_VLForConditionalGeneration` (`vlmzip.serving.qwen`): Qwen2.5-VL, images and videos;
- `VisionZipQwen3VLForConditionalGeneration` (`vlmzip.serving.qwen3`): Qwen3-VL, images and videos.
"""

from __future__ import annotations

import sys
from typing import Any

from vlmzip.serving.settings import ARCHITECTURE, PLUGIN_MODULES, check_overrides_target, requested_from_argv

MODEL_PATH = f"{PLUGIN_MODULES[ARCHITECTURE]}:{ARCHITECTURE}"
MODEL_PATHS = {architecture: f"{module}:{architecture}" for architecture, module in PLUGIN_MODULES.items()}


def _engine_arguments() -> Any:
    """The vLLM EngineArgs being set up in this process, if register() runs inside their construction."""
    from vllm.engine.arg_utils import EngineArgs

    frame = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, EngineArgs):
            return candidate
        frame = frame.f_back
    return None


def register() -> None:
    """Register the VisionZip model classes with vLLM's model registry (safe to call repeatedly).

    Also refuses to start when --hf-overrides (command line or `LLM(hf_overrides=...)`) sets a
    VisionZip budget for a model the plugin does not serve, which would silently use every token.
    """
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    for architecture, path in MODEL_PATHS.items():
        if architecture not in supported:
            ModelRegistry.register_model(architecture, path)
    check_overrides_target(*requested_from_argv(sys.argv))
    engine = _engine_arguments()
    if engine is not None:
        check_overrides_target(getattr(engine, "model", None), getattr(engine, "hf_overrides", None))


__all__ = ["ARCHITECTURE", "MODEL_PATH", "MODEL_PATHS", "register"]
