"""What a fine-tuning run takes (`FinetuneOptions`, all validated) and what it gives back (`FinetuneResult`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlmzip.config import VisionZipConfig, check_int

PROJECTOR_FILE = "projector.safetensors"  # --adapter-only output: the projector's weights
SUMMARY_FILE = "visionzip_finetune.json"  # what was trained, on what, and the loss curve
RUN_FILE = "run.json"  # settings of a run in progress, compared on resume
LOSS_FILE = "loss_sum.json"  # in each checkpoint: the training loss summed over its steps, for the mean on resume
PARTIAL_SUFFIX = ".partial"  # the run's working directory, beside the output directory
IMAGE_KEYS = "visionzip_image_keys"  # batch entry naming the cached reductions of the batch's images
TOWER_BATCH = 8  # images per tower pass when filling the cache
# Without --data: this much of the embedded model's training split (scenes it was trained on).
DEFAULT_TRAIN_IMAGES = 300
DEFAULT_PER_TYPE = 2
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup", "cosine_with_restarts", "polynomial")


def _check_float(
    name: str, value: Any, minimum: float, maximum: float | None = None, *, open_min: bool = False
) -> float:
    low = "(" if open_min else "["
    bounds = f"in {low}{minimum}, {maximum}]" if maximum is not None else f"{'>' if open_min else '>='} {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number {bounds}, got {type(value).__name__} {value!r}")
    value = float(value)
    too_low = value <= minimum if open_min else value < minimum
    if not math.isfinite(value) or too_low or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be a number {bounds}, got {value}")
    return value


@dataclass(frozen=True)
class FinetuneOptions:
    """Training settings of `finetune_projector` (all validated here).

    epochs: passes over the data (fractions allowed); ignored when `max_steps` is set.
    max_steps: optimizer steps in total, or None to train for `epochs`.
    batch_size: question-answer pairs per step.
    learning_rate: peak learning rate of the projector (AdamW).
    warmup_ratio: fraction of the steps spent warming the learning rate up, in [0, 1).
    scheduler: learning-rate schedule after warmup (a transformers scheduler name).
    weight_decay: AdamW weight decay.
    save_steps: checkpoint every this many steps (a run resumes from the latest).
    logging_steps: log the loss every this many steps.
    seed: seed of the data order and of everything random in training.
    cache_features: compute each image's reduced tower features once and reuse them.
    on_error: "stop" at the first bad data row or image, or "skip" it and report it.
    prompt_template: text around each question, with `{question}` and the processor's image token
        (as `vlmzip eval --prompt` takes it); None uses the processor's chat template.
    limit: train on the first `limit` records only (None: all).
    """

    epochs: float = 3.0
    max_steps: int | None = None
    batch_size: int = 8
    learning_rate: float = 1e-3
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    save_steps: int = 50
    logging_steps: int = 10
    seed: int = 0
    cache_features: bool = True
    on_error: str = "stop"
    prompt_template: str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "epochs", _check_float("epochs", self.epochs, 0.0, open_min=True))
        if self.max_steps is not None:
            object.__setattr__(self, "max_steps", check_int("max_steps", self.max_steps, 1))
        object.__setattr__(self, "batch_size", check_int("batch_size", self.batch_size, 1))
        object.__setattr__(
            self, "learning_rate", _check_float("learning_rate", self.learning_rate, 0.0, 1.0, open_min=True)
        )
        warmup = _check_float("warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if warmup >= 1.0:
            raise ValueError(f"warmup_ratio must be a number in [0.0, 1.0), got {warmup}")
        object.__setattr__(self, "warmup_ratio", warmup)
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {self.scheduler!r}")
        object.__setattr__(self, "weight_decay", _check_float("weight_decay", self.weight_decay, 0.0))
        object.__setattr__(self, "save_steps", check_int("save_steps", self.save_steps, 1))
        object.__setattr__(self, "logging_steps", check_int("logging_steps", self.logging_steps, 1))
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0))
        if not isinstance(self.cache_features, bool):
            raise TypeError(f"cache_features must be True or False, got {self.cache_features!r}")
        if self.on_error not in ("stop", "skip"):
            raise ValueError(f"on_error must be 'stop' or 'skip', got {self.on_error!r}")
        if self.prompt_template is not None:
            if not isinstance(self.prompt_template, str) or "{question}" not in self.prompt_template:
                raise ValueError(
                    f"prompt_template must be a string containing {{question}}, got {self.prompt_template!r}"
                )
        if self.limit is not None:
            object.__setattr__(self, "limit", check_int("limit", self.limit, 1))


@dataclass
class FinetuneResult:
    """What a fine-tuning run produced."""

    output_dir: Path
    config: VisionZipConfig
    examples: int  # question-answer pairs trained on
    images: int
    problems: list[str]  # skipped data rows and images (on_error="skip")
    steps: int
    train_loss: float  # mean training loss over the run
    precompute_seconds: float  # wall clock: loading, tokenising and (with the cache) the tower pass
    train_seconds: float  # wall clock of the Trainer
    # CPU time of this process (all threads) for the same two phases: on a shared machine it shows
    # the work done, which the wall clock does not.
    precompute_cpu_seconds: float = 0.0
    train_cpu_seconds: float = 0.0
    log_history: list[dict[str, Any]] = field(default_factory=list)
