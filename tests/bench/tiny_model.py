"""Tiny models of every supported family saved as local model directories, for the command-line tests.

The models and processors come from the shared builders (conftest, families); this module only saves
them the way a downloaded checkpoint is laid out, so that `vlmzip bench/eval --model DIR` load them
through `vlmzip.loading.load_model` like any other directory.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from helpers import BUILDERS
from vlmzip.loading import image_only_processor_class
from vlmzip.pixtral_processor import PixtralPilProcessor


def saveable_processor(processor: Any) -> Any:
    """`processor` as its transformers class, without a video slot where it has one.

    The test processors are subclasses that work without torchvision (no video processor, or a PIL
    one that transformers cannot save); the saved directory names the real class, as a checkpoint does.
    """
    if isinstance(processor, PixtralPilProcessor):
        return processor  # saves as a PixtralProcessor
    real = next(cls for cls in type(processor).__mro__ if cls.__module__.startswith("transformers."))
    if "video_processor" not in real.get_attributes() and real is type(processor):
        return processor
    parameters = set(inspect.signature(real.__init__).parameters) - {"self", "video_processor", "args", "kwargs"}
    settings = {name: getattr(processor, name) for name in parameters if hasattr(processor, name)}
    return image_only_processor_class(real)(**settings)


def save_family(family: str, path: Path) -> Path:
    """Save the tiny model and processor of `family` (a helpers.BUILDERS key) into `path`; return `path`."""
    build_model, build_processor = BUILDERS[family]
    model = build_model()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    saveable_processor(build_processor()).save_pretrained(path)
    return path


def save_tiny_llava(path: Path) -> Path:
    return save_family("llava-1.5", path)
