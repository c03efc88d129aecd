"""Loading local models and images with clear errors: shared by every command."""

from __future__ import annotations

import inspect
import types
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
        processor = _load_without_torchvision(path)
        if processor is None:
            raise ValueError(f"cannot load the processor in {path}: {error}") from None
    if getattr(processor, "image_processor", None) is None:
        # AutoProcessor falls back to the bare tokenizer when it does not know the processor class: images
        # would then be dropped without a word, so refuse instead.
        raise ValueError(
            f"cannot load an image processor from {path}: transformers gave a {type(processor).__name__}; "
            "check processor_class in its processor_config.json (a transformers processor of the model's family)"
        )
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

    namespace: dict[str, Any] = {"get_attributes": classmethod(get_attributes)}
    init = processor_class.__init__
    parameters = inspect.signature(init).parameters
    if "video_processor" in parameters and parameters["video_processor"].default is inspect.Parameter.empty:
        # Some processors (SmolVLM) require the argument: the same function with None as its default.
        # (transformers reads the settings it may pass from the function's code, so no wrapper.)
        positional = [p for p in list(parameters.values())[1:] if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
        defaults = tuple(None if p.default is inspect.Parameter.empty else p.default for p in positional)
        optional = types.FunctionType(init.__code__, init.__globals__, init.__name__, defaults, init.__closure__)
        optional.__kwdefaults__ = init.__kwdefaults__
        namespace["__init__"] = optional
    return type(processor_class.__name__, (processor_class,), namespace)


def _load_without_torchvision(path: Path) -> Any | None:
    """The processor of a model directory built without torchvision; None when that fails.

    Processors with a video slot load without it (`image_only_processor_class`); Mistral 3's
    `PixtralProcessor`, which cannot be imported without torchvision, loads as `PixtralPilProcessor`.
    """
    import json

    import transformers

    try:
        config = json.loads((path / "processor_config.json").read_text(encoding="utf-8"))
        name = config["processor_class"]
        if name == "PixtralProcessor":
            from vlmzip.pixtral_processor import PixtralPilProcessor

            return PixtralPilProcessor.from_pretrained(path, local_files_only=True)
        processor_class = getattr(transformers, name)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError):
        return None
    if not isinstance(processor_class, type) or "video_processor" not in processor_class.get_attributes():
        return None
    try:
        return image_only_processor_class(processor_class).from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, ImportError):
        return None
