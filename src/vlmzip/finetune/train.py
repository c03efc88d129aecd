"""`finetune_projector`: train only the projector on reduced tokens, one readable step at a time."""

from __future__ import annotations

import dataclasses
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmzip.api import is_applied
from vlmzip.config import VisionZipConfig
from vlmzip.data import VQARecord
from vlmzip.finetune.cache import ReducedFeatureCache, cache_serves_like_tower
from vlmzip.finetune.options import FinetuneOptions, FinetuneResult
from vlmzip.finetune.prepare import Collator, Prepared, image_loader, load_records, padding_id, prepare_examples, where
from vlmzip.finetune.results import save_result
from vlmzip.finetune.run_directory import RunDirectory
from vlmzip.finetune.trainer import make_trainer, projector_training, require_trainer, training_arguments
from vlmzip.loading import load_model
from vlmzip.outputs import model_inputs, refuse_overlap


def finetune_projector(
    model: str | Path | nn.Module | None,
    data: str | Path | Sequence[VQARecord],
    config: VisionZipConfig,
    output_dir: str | Path,
    *,
    processor: Any | None = None,
    resume: bool = False,
    overwrite: bool = False,
    adapter_only: bool = False,
    progress: bool = True,
    callbacks: Sequence[Any] = (),
    **options: Any,
) -> FinetuneResult:
    """Train only the projector of `model` on VQA pairs with `config`'s reduction in the forward pass.

    Args:
        model: a model directory, None for the embedded default model, or a loaded model (trained
            in place; pass its `processor` too).
        data: a VQA JSONL file (`vlmzip.data` format) or a list of `VQARecord`.
        config: the budget to tune for, recorded in the output's `visionzip_config.json`.
        output_dir: where the result goes: a `from_pretrained` model directory with its processor, or
            with `adapter_only` just `projector.safetensors` (see `load_projector`). Refused when it
            exists unless `overwrite`.
        resume: continue an interrupted run from its latest checkpoint (same settings).
        callbacks: extra `transformers.TrainerCallback`s.
        **options: `FinetuneOptions` fields (epochs, max_steps, batch_size, learning_rate, ...).
    """
    options = FinetuneOptions(**options)
    require_trainer()
    _check_arguments(config, output_dir, resume=resume, overwrite=overwrite, adapter_only=adapter_only)
    model_id, inputs = _model_identity(model, processor)
    run_dir = RunDirectory(Path(output_dir))
    if isinstance(data, (str, Path)):
        inputs.append(("--data", data))
    refuse_overlap(run_dir.output, inputs)  # before reading the data, which may be the output itself
    records, problems, data_fingerprint = load_records(data, options)
    images = {record.image: record for record in records}.values()
    run_dir.check(resume, overwrite, [*inputs, *((f"image of {where(r, data)}", r.image) for r in images)])
    run = _run_settings(model_id, data_fingerprint, config, adapter_only, options)
    if resume:
        run_dir.check_resumable(run)

    model, processor = _loaded(model, processor, options)
    with projector_training(model, config) as (adapter, projector):
        cache = ReducedFeatureCache() if options.cache_features else None
        prepared = prepare_examples(data, records, processor, options, adapter.reduce, cache, progress)
        problems = problems + prepared.problems
        cache = _checked_cache(adapter, cache, prepared)
        with adapter.reductions_from(cache.reduction_for) if cache is not None else nullcontext():
            trainer, output, train_seconds, train_cpu_seconds = _train(
                model, processor, projector, prepared, cache, run_dir, run, resume, options, progress, callbacks
            )

    result = FinetuneResult(
        output_dir=run_dir.output,
        config=config,
        examples=len(prepared.examples),
        images=len(prepared.images),
        problems=problems,
        steps=int(output.global_step),
        train_loss=trainer.mean_loss(),
        precompute_seconds=prepared.seconds,
        train_seconds=train_seconds,
        precompute_cpu_seconds=prepared.cpu_seconds,
        train_cpu_seconds=train_cpu_seconds,
        log_history=list(trainer.state.log_history),
    )
    save_result(model, processor, projector, result, run, adapter_only, run_dir.staged)
    run_dir.finish()
    return result


def _check_arguments(
    config: VisionZipConfig, output_dir: str | Path, *, resume: bool, overwrite: bool, adapter_only: bool
) -> None:
    if not isinstance(config, VisionZipConfig):
        raise TypeError(f"config must be a VisionZipConfig, got {type(config).__name__}")
    if config.attention_mass is not None:
        raise ValueError("config.attention_mass: projector fine-tuning takes a fixed budget; set attention_mass=None")
    if not isinstance(output_dir, (str, Path)) or not str(output_dir):
        raise TypeError(f"output_dir must be a directory path, got {output_dir!r}")
    for name, flag in (("resume", resume), ("overwrite", overwrite), ("adapter_only", adapter_only)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")


def _model_identity(model: Any, processor: Any | None) -> tuple[str, list[tuple[str, Any]]]:
    """(the model's name as a run records it, the input paths an output must not overwrite)."""
    if isinstance(model, nn.Module):
        if processor is None:
            raise ValueError("processor is required when model is a loaded model")
        if is_applied(model):
            raise ValueError("model already has VisionZip applied; call vlmzip.remove(model) first")
        model_id = str(getattr(model, "name_or_path", "") or type(model).__name__)
        return model_id, [("model", model_id)] if Path(model_id).is_dir() else []
    if model is None or isinstance(model, (str, Path)):
        return (str(Path(model).resolve()) if model is not None else "default"), model_inputs(model)
    raise TypeError(f"model must be a model directory, None or a loaded model, got {type(model).__name__}")


def _run_settings(
    model_id: str, data_fingerprint: str, config: VisionZipConfig, adapter_only: bool, options: FinetuneOptions
) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one (not how it is computed or reported)."""
    return {
        "model": model_id,
        "data": data_fingerprint,
        "config": config.to_dict(),
        "adapter_only": adapter_only,
        **{k: v for k, v in dataclasses.asdict(options).items() if k not in ("cache_features", "on_error")},
    }


def _loaded(model: Any, processor: Any | None, options: FinetuneOptions) -> tuple[nn.Module, Any]:
    """The model and processor, loaded when given by name; the prompt template checked against the processor."""
    if not isinstance(model, nn.Module):
        model, loaded_processor = load_model(model)
        processor = processor or loaded_processor
    image_token = getattr(processor, "image_token", None)
    if options.prompt_template is not None and image_token and image_token not in options.prompt_template:
        raise ValueError(f"prompt_template must contain the image token {image_token}, got {options.prompt_template!r}")
    return model, processor


def _checked_cache(adapter: Any, cache: ReducedFeatureCache | None, prepared: Prepared) -> ReducedFeatureCache | None:
    """The filled cache, or None (the tower runs every step) when it does not reproduce the model's inputs."""
    if cache is None or cache_serves_like_tower(adapter, cache, prepared.examples[0], prepared.first_pixels):
        return cache
    warnings.warn(
        "cached tower features do not reproduce this model's inputs; running the tower every step", stacklevel=3
    )
    return None


def _train(
    model: nn.Module,
    processor: Any,
    projector: nn.Module,
    prepared: Prepared,
    cache: ReducedFeatureCache | None,
    run_dir: RunDirectory,
    run: dict[str, Any],
    resume: bool,
    options: FinetuneOptions,
    progress: bool,
    callbacks: Sequence[Any],
) -> tuple[Any, Any, float, float]:
    """Run the Trainer (from the latest checkpoint on resume): (trainer, its output, wall seconds, CPU seconds)."""
    pixels: Callable[[list[int]], torch.Tensor]
    pixels = cache.stand_in_pixels if cache is not None else image_loader(processor, prepared.images)
    checkpoint = run_dir.start(run, resume)
    if resume and checkpoint is None:
        warnings.warn(f"no checkpoint to resume from in {run_dir.work}; training from the beginning", stacklevel=3)
    trainer = make_trainer(
        model=model,
        args=training_arguments(options, run_dir.checkpoints, progress),
        train_dataset=prepared.examples,
        data_collator=Collator(padding_id(processor), pixels, with_keys=cache is not None),
        callbacks=list(callbacks),
        projector=projector,
        cache=cache,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    try:
        output = trainer.train(resume_from_checkpoint=checkpoint)
    except KeyboardInterrupt:
        print(f"interrupted; checkpoints are in {run_dir.checkpoints} (run again with resume)", file=sys.stderr)
        raise
    return trainer, output, time.perf_counter() - start, time.process_time() - cpu_start
