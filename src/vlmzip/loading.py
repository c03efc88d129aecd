"""Loading local models and images with clear errors: shared by every command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmzip.images import MAX_IMAGE_PIXELS, load_image

__all__ = ["MAX_IMAGE_PIXELS", "image_only_processor_class", "load_image", "load_model"]


def load_model(model: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """(model, processor) from a local directory, or the embedded default model when `model` is None.

    Only families visionzip supports are accepted; the processor's tokenizer is set to left padding
    (what batched generation needs).
    """
    if model is None:
        from vlmzip.default_model import load_default_model

        return load_default_model(dtype=dtype)

    import transformers
    from transformers import AutoConfig, AutoProcessor

    from vlmzip.adapters import supported_families

    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"not a transformers model directory (no config.json): {path}")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot read the model config in {path}: {error}") from None
    architectures = list(getattr(config, "architectures", None) or [])
    supported = [name for name in architectures if name in supported_families()]
    if not supported:
        raise ValueError(
            f"model in {path} is {architectures or 'of unknown architecture'}; supported: {supported_families()}"
        )
    model_class = getattr(transformers, supported[0])
    loaded = model_class.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    try:
        processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError) as error:
        processor = _load_without_video_slot(path)
        if processor is None:
            raise ValueError(f"cannot load the processor in {path}: {error}") from None
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    return loaded, processor


def image_only_processor_class(processor_class: type) -> type:
    """`processor_class` without its video processor part, under the same name (so it saves as the real class).

    Processors with a video slot (Qwen2-VL, LLaVA-OneVision) cannot be built without torchvision, which
    their video processors need; images need only the image processor and the tokenizer. transformers
    loads, checks and saves the parts that `get_attributes()` lists, so leaving `video_processor` out
    there is enough; every other setting (e.g. OneVision's `vision_aspect_ratio`) loads and saves as usual.
    """
    if not isinstance(processor_class, type) or not hasattr(processor_class, "get_attributes"):
        raise TypeError(f"processor_class must be a transformers processor class, got {processor_class!r}")

    def get_attributes(cls: type) -> list[str]:
        return [name for name in processor_class.get_attributes() if name != "video_processor"]

    return type(processor_class.__name__, (processor_class,), {"get_attributes": classmethod(get_attributes)})


def _load_without_video_slot(path: Path) -> Any | None:
    """The image-only processor of a model directory whose processor has a video slot; None when that fails."""
    import json

    import transformers

    try:
        config = json.loads((path / "processor_config.json").read_text(encoding="utf-8"))
        processor_class = getattr(transformers, config["processor_class"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if not isinstance(processor_class, type) or "video_processor" not in processor_class.get_attributes():
        return None
    try:
        return image_only_processor_class(processor_class).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None
