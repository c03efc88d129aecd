"""A finished run's output: the model directory (or the projector's weights alone), its budget and summary."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from torch import nn

from vlmzip.api import SAVED_CONFIG_NAME, load_saved_config
from vlmzip.config import VisionZipConfig
from vlmzip.finetune.options import PROJECTOR_FILE, SUMMARY_FILE, FinetuneResult
from vlmzip.finetune.weights import load_into, projector_names, projector_of


def save_result(
    model: nn.Module,
    processor: Any,
    projector: nn.Module,
    result: FinetuneResult,
    run: dict[str, Any],
    adapter_only: bool,
    target: Path,
) -> None:
    """Write the result into `target` (replaced): the model and processor, or with `adapter_only` the
    projector's weights under the whole model's names; the budget; the run's summary."""
    from safetensors.torch import save_file

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if adapter_only:
        names = projector_names(model, projector)
        state = {names[name]: p.detach().cpu().contiguous() for name, p in projector.named_parameters()}
        save_file(state, str(target / PROJECTOR_FILE), metadata={"format": "pt"})
    else:
        model.save_pretrained(str(target))
        processor.save_pretrained(str(target))
    (target / SAVED_CONFIG_NAME).write_text(json.dumps(result.config.to_dict(), indent=2) + "\n", encoding="utf-8")
    summary = {
        **run,
        "examples": result.examples,
        "images": result.images,
        "skipped": result.problems,
        "steps": result.steps,
        "train_loss": result.train_loss,
        "precompute_seconds": round(result.precompute_seconds, 2),
        "train_seconds": round(result.train_seconds, 2),
        "precompute_cpu_seconds": round(result.precompute_cpu_seconds, 2),
        "train_cpu_seconds": round(result.train_cpu_seconds, 2),
        "log_history": result.log_history,
    }
    (target / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def load_projector(model: nn.Module, path: str | Path) -> VisionZipConfig | None:
    """Put projector weights saved with `adapter_only=True` on top of `model` (the same base model).

    `path` is the output directory (or its `projector.safetensors`). Returns the budget it was tuned
    for, to pass to `vlmzip.apply(model, config)`.
    """
    from safetensors.torch import load_file

    from vlmzip.adapters import geometry_of

    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a directory or a {PROJECTOR_FILE} path, got {type(path).__name__}")
    path = Path(path)
    file = path / PROJECTOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"projector weights not found: {file}")
    projector = projector_of(geometry_of(model))  # where the projector is: the family's geometry, no budget
    config = load_saved_config(file.parent)
    load_into(model, load_file(str(file)), list(projector_names(model, projector).values()), file)
    return config
