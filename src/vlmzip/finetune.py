"""Projector fine-tuning on reduced tokens (the paper's "VisionZip‡").

The language model learned to read the full token sequence; with VisionZip it reads `dominant +
contextual` tokens whose statistics differ (merged contextual tokens in particular). Training only
the multimodal projector on the reduced tokens closes much of the remaining accuracy gap while the
vision tower and the language model stay frozen.

Training runs the model's own forward with VisionZip applied (`model(**processor_inputs, labels=...)`
prepares itself and shrinks `labels` with the placeholders; the loss covers the answer tokens only),
driven by the Hugging Face `Trainer` (checkpoints, resume, progress bar, schedule, loss logging).

The tower is frozen and its reduced output does not depend on the projector, so by default the
reduction of every image is computed once before training and served in place of the tower
afterwards: a training step then runs only projector + language model. Batches in that mode carry
shape-only `pixel_values` (the adapter reads their shape to count placeholders) and the images'
cache keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import numbers
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmzip.adapters.base import IGNORE_INDEX
from vlmzip.api import SAVED_CONFIG_NAME, apply, get_state, is_applied, load_saved_config, remove
from vlmzip.config import VisionZipConfig, check_int
from vlmzip.core import Reduction
from vlmzip.data import DataError, VQARecord, load_vqa_jsonl
from vlmzip.loading import load_image, load_model
from vlmzip.outputs import model_inputs, refuse_overlap, swap_into_place

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


# --- examples ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One tokenised question-answer pair: the processor's full-length placeholders, no padding."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) IGNORE_INDEX except the answer tokens and the end-of-sequence token
    image: int  # index into the run's list of images (the cache key)


def build_prompt(processor: Any, question: str, template: str | None = None) -> str:
    """The prompt for one image and one question, ending where the answer starts.

    The same text `vlmzip eval` and `vlmzip demo` ask with: `template` with `{question}` replaced,
    or the processor's chat template.
    """
    if template is not None:
        return template.replace("{question}", question)
    from vlmzip.demo import build_prompt as chat_prompt

    return chat_prompt(processor, question)


def _answer_tokens(tokenizer: Any, prompt: str, answer: str) -> tuple[int, list[int]]:
    """(prompt tokens to drop from the end, answer token ids incl. end-of-sequence).

    Tokenising prompt and prompt + answer together keeps whatever the tokenizer does at the boundary
    (sentencepiece merges the space into the answer's first piece); the tokens after the common prefix
    are the answer.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(f"{prompt} {answer}")["input_ids"]
    common = 0
    while common < min(len(prompt_ids), len(full_ids)) and prompt_ids[common] == full_ids[common]:
        common += 1
    answer_ids = list(full_ids[common:])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the processor's tokenizer has no eos_token_id: the answer needs an end token")
    if not answer_ids or answer_ids[-1] != eos:
        answer_ids.append(eos)
    return len(prompt_ids) - common, answer_ids


def _prompt_ids(processor: Any, image: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(pixel_values (1, C, H, W), the processor's token ids of each prompt), processing the image once.

    The processor expands the image token of the first prompt into the image's placeholder run; the
    other prompts get the same run spliced into their text-only tokens. The splice is checked against
    the processor on the first prompt; processors that expand differently get the processor for every
    prompt (the image is processed again each time, which is slower but equal).
    """
    first = processor(images=[image], text=list(prompts[:1]), return_tensors="pt")
    first_ids = first["input_ids"][0]
    token_id = getattr(processor, "image_token_id", None)
    run = int((first_ids == token_id).sum()) if token_id is not None else 0

    def spliced(prompt: str) -> torch.Tensor | None:
        ids = torch.tensor(processor.tokenizer(prompt)["input_ids"], dtype=first_ids.dtype)
        at = (ids == token_id).nonzero().flatten()
        if at.numel() != 1:
            return None
        return torch.cat([ids[: int(at)], ids.new_full((run,), token_id), ids[int(at) + 1 :]])

    if run:
        candidate = spliced(prompts[0])
        rest = [spliced(prompt) for prompt in prompts[1:]]
        if candidate is not None and torch.equal(candidate, first_ids) and all(r is not None for r in rest):
            return first["pixel_values"], [first_ids, *rest]
    ids = [first_ids]
    if len(prompts) > 1:
        others = processor(
            images=[image] * (len(prompts) - 1), text=list(prompts[1:]), return_tensors="pt", padding=True
        )
        ids += [row[mask.bool()] for row, mask in zip(others["input_ids"], others["attention_mask"], strict=True)]
    return first["pixel_values"], ids


def encode_image_examples(
    processor: Any, image: Any, questions: Sequence[tuple[str, str]], prompt_template: str | None = None
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Tokenise (question, answer) pairs about one image. Returns (pixel_values (1, C, H, W), [(ids, labels)])."""
    prompts = [build_prompt(processor, question, prompt_template) for question, _ in questions]
    pixel_values, prompt_ids = _prompt_ids(processor, image, prompts)
    pairs = []
    for ids, prompt, (_, answer) in zip(prompt_ids, prompts, questions, strict=True):
        drop, answer_ids = _answer_tokens(processor.tokenizer, prompt, answer)
        prompt_part = ids[: ids.numel() - drop]
        answer_part = torch.tensor(answer_ids, dtype=ids.dtype)
        labels = torch.cat([torch.full_like(prompt_part, IGNORE_INDEX), answer_part])
        pairs.append((torch.cat([prompt_part, answer_part]), labels))
    return pixel_values, pairs


# --- the reduced-feature cache -----------------------------------------------------------------


class ReducedFeatureCache:
    """Each image's reduction, computed once by the adapter's own `reduce` and served in its place.

    Set as the adapter instance's `reduce`, it answers for the images named by `serving(keys)`: the
    pixel_values of those batches are shape-only stand-ins (`stand_in_pixels`).
    """

    def __init__(self) -> None:
        self._rows: list[Reduction] = []
        self._pixel_shapes: list[torch.Size] = []
        self._serving: list[int] | None = None

    def __len__(self) -> int:
        return len(self._rows)

    def add(self, reduction: Reduction, pixel_values: torch.Tensor) -> list[int]:
        """Store one reduced batch row by row; returns the rows' keys."""
        keys = []
        for row in range(reduction.features.shape[0]):
            keys.append(len(self._rows))
            scores = reduction.scores[row].detach().cpu() if reduction.scores is not None else None
            self._rows.append(
                Reduction(
                    features=reduction.features[row].detach().cpu(),
                    kept_indices=reduction.kept_indices[row].detach().cpu(),
                    groups=reduction.groups[row].detach().cpu(),
                    scores=scores,
                )
            )
            self._pixel_shapes.append(pixel_values.shape[1:])
        return keys

    def stand_in_pixels(self, keys: Sequence[int]) -> torch.Tensor:
        """Shape-only pixel_values for these images (no memory: one element, expanded)."""
        shapes = {self._pixel_shapes[key] for key in keys}
        if len(shapes) != 1:
            raise ValueError(f"images of one batch must share one pixel shape, got {sorted(map(tuple, shapes))}")
        return torch.zeros(()).expand(len(keys), *shapes.pop())

    @contextmanager
    def serving(self, keys: Sequence[int]) -> Iterator[None]:
        self._serving = list(keys)
        try:
            yield
        finally:
            self._serving = None

    def reduce(self, pixel_values: torch.Tensor, **tower_kwargs: Any) -> tuple[None, Reduction]:
        keys = self._serving
        if keys is None or len(keys) != pixel_values.shape[0]:
            raise RuntimeError(
                "the reduced-feature cache was asked for images it was not told about; "
                "batches need their image keys (or train with cache_features=False)"
            )
        rows = [self._rows[key] for key in keys]
        device = pixel_values.device
        scores = [row.scores for row in rows]
        reduction = Reduction(
            features=torch.stack([row.features for row in rows]).to(device),
            kept_indices=torch.stack([row.kept_indices for row in rows]).to(device),
            groups=torch.stack([row.groups for row in rows]).to(device),
            scores=torch.stack(scores).to(device) if all(s is not None for s in scores) else None,
        )
        return None, reduction  # no probe: the tower did not run


# --- data ---------------------------------------------------------------------------------------


def _load_records(data: Any, options: FinetuneOptions) -> tuple[list[VQARecord], list[str], str]:
    """(records, problems, fingerprint) from a JSONL path or a sequence of VQARecord."""
    if isinstance(data, (str, Path)):
        records, problems = load_vqa_jsonl(data, on_error=options.on_error)  # type: ignore[arg-type]
        fingerprint = hashlib.sha256(Path(data).read_bytes()).hexdigest()
    elif isinstance(data, Sequence) and data and all(isinstance(r, VQARecord) for r in data):
        records, problems = list(data), []
        fingerprint = hashlib.sha256(repr(records).encode()).hexdigest()
    else:
        raise TypeError(f"data must be a VQA JSONL path or a non-empty list of VQARecord, got {type(data).__name__}")
    if options.limit is not None:
        records = records[: options.limit]
    return records, problems, fingerprint


def _where(record: VQARecord, data: Any) -> str:
    return f"{data}:{record.line}" if isinstance(data, (str, Path)) else f"record at line {record.line}"


@dataclass
class _Prepared:
    examples: list[Example]
    images: list[Path]
    problems: list[str]
    seconds: float
    cpu_seconds: float
    first_pixels: torch.Tensor | None = None  # pixel_values of images[0], for the cache's self-check


def _prepare_examples(
    data: Any,
    records: Sequence[VQARecord],
    processor: Any,
    options: FinetuneOptions,
    reduce: Callable[[torch.Tensor], tuple[Any, Reduction]] | None,
    cache: ReducedFeatureCache | None,
    progress: bool,
) -> _Prepared:
    """Load each image once, tokenise its questions, and (with a cache) reduce it once.

    The first accepted answer of each record is the training target.
    """
    from tqdm.auto import tqdm

    start, cpu_start = time.perf_counter(), time.process_time()
    by_image: dict[Path, list[VQARecord]] = {}
    for record in records:
        by_image.setdefault(record.image, []).append(record)
    examples: list[Example] = []
    images: list[Path] = []
    problems: list[str] = []
    pending: list[tuple[int, torch.Tensor]] = []  # (image index, pixel_values) waiting for the tower
    first_pixels = None

    def flush() -> None:
        if cache is None or not pending:
            return
        pixels = torch.cat([p for _, p in pending])
        with torch.no_grad():
            _, reduction = reduce(pixels)
        keys = cache.add(reduction, pixels)
        if keys != [index for index, _ in pending]:
            raise RuntimeError("reduced-feature cache keys out of step with the image list")
        pending.clear()

    bar = tqdm(
        total=len(by_image), desc="reducing images" if cache is not None else "loading images", disable=not progress
    )
    for path, group in by_image.items():
        try:
            image = load_image(path, processor)
            pixels, pairs = encode_image_examples(
                processor, image, [(r.question, r.answers[0]) for r in group], options.prompt_template
            )
        except (OSError, ValueError) as error:
            message = f"{_where(group[0], data)}: {error}"
            if options.on_error == "stop":
                raise DataError(message) from None
            problems.extend(f"{_where(r, data)}: {error}" for r in group)
            bar.update(1)
            continue
        index = len(images)
        if index == 0:
            first_pixels = pixels
        images.append(path)
        examples.extend(Example(ids, labels, index) for ids, labels in pairs)
        if cache is not None:
            pending.append((index, pixels))
            if len(pending) >= TOWER_BATCH:
                flush()
        bar.update(1)
    flush()
    bar.close()
    if not examples:
        raise DataError(f"{data}: no usable training examples ({len(problems)} skipped)")
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return _Prepared(examples, images, problems, seconds, cpu_seconds, first_pixels)


def _cache_serves_like_tower(adapter: Any, cache: ReducedFeatureCache, prepared: _Prepared) -> bool:
    """Prepare one example through the tower and through the cache: the model inputs must agree.

    Guards families whose `encode` needs more than the reduction (the cache serves no probe).
    """
    example = prepared.examples[0]
    inputs = {"input_ids": example.input_ids[None], "attention_mask": torch.ones_like(example.input_ids)[None]}
    with torch.no_grad():
        expected = adapter.prepare({**inputs, "pixel_values": prepared.first_pixels})
        tower_reduce = adapter.reduce
        adapter.reduce = cache.reduce
        try:
            with cache.serving([example.image]):
                served = adapter.prepare({**inputs, "pixel_values": cache.stand_in_pixels([example.image])})
        except (RuntimeError, ValueError, TypeError, AttributeError):
            return False
        finally:
            adapter.reduce = tower_reduce
    if expected.keys() != served.keys():
        return False
    for key, value in expected.items():
        if isinstance(value, torch.Tensor) and not torch.equal(value, served[key]):
            return False
    modality = adapter.modality
    pairs = zip(
        expected["mm_encoder_outputs"][modality].pooler_output,
        served["mm_encoder_outputs"][modality].pooler_output,
        strict=True,
    )
    return all(a.shape == b.shape and torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in pairs)


class _Collator:
    """Right-pads examples into a batch; pixel_values come from the cache's stand-ins or the images."""

    def __init__(self, pad_token_id: int, pixels: Callable[[list[int]], torch.Tensor], with_keys: bool) -> None:
        self.pad_token_id = pad_token_id
        self.pixels = pixels
        self.with_keys = with_keys

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        length = max(e.input_ids.numel() for e in examples)
        input_ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            size = example.input_ids.numel()
            input_ids[row, :size] = example.input_ids
            labels[row, :size] = example.labels
            attention_mask[row, :size] = 1
        keys = [e.image for e in examples]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
        batch["pixel_values"] = self.pixels(keys)
        if self.with_keys:
            batch[IMAGE_KEYS] = keys
        return batch


# --- model, projector, checkpoints -------------------------------------------------------------


def _projector(adapter: Any) -> nn.Module:
    get = getattr(adapter, "projector", None)
    if get is None:
        name = type(adapter.model).__name__
        raise ValueError(f"model: projector fine-tuning is not available for {name} (its adapter has no projector)")
    return get()


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, under the model's own state-dict names, on CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def _projector_names(model: nn.Module, projector: nn.Module) -> dict[str, str]:
    """Projector parameter name -> the same parameter's name in the whole model."""
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return {name: by_id[id(p)] for name, p in projector.named_parameters()}


def _load_into(model: nn.Module, state: dict[str, torch.Tensor], expected: Sequence[str], source: Path) -> None:
    """Copy `state` into the model's parameters named `expected` (exactly those), checking shapes."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: projector weights do not match this model (missing {missing}, unexpected {unexpected})"
        )
    parameters = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in expected:
            target = parameters[name]
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(
                    f"{source}: {name} has shape {tuple(state[name].shape)}, the model needs {tuple(target.shape)}"
                )
            target.copy_(state[name].to(device=target.device, dtype=target.dtype))


def load_projector(model: nn.Module, path: str | Path) -> VisionZipConfig | None:
    """Put projector weights saved with `adapter_only=True` on top of `model` (the same base model).

    `path` is the output directory (or its `projector.safetensors`). Returns the budget it was tuned
    for, to pass to `vlmzip.apply(model, config)`.
    """
    from safetensors.torch import load_file

    from vlmzip.adapters import adapter_class_for

    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a directory or a {PROJECTOR_FILE} path, got {type(path).__name__}")
    path = Path(path)
    file = path / PROJECTOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"projector weights not found: {file}")
    # An adapter built only to ask where the projector is (the smallest budget, never applied).
    projector = _projector(adapter_class_for(model)(model, VisionZipConfig(dominant=1, contextual=0)))
    config = load_saved_config(file.parent)
    _load_into(model, load_file(str(file)), list(_projector_names(model, projector).values()), file)
    return config


def _require_trainer() -> None:
    from transformers.utils import is_accelerate_available

    if not is_accelerate_available():
        raise ImportError("projector fine-tuning needs the accelerate package: pip install 'vlmzip[finetune]'")


def _make_trainer(**kwargs: Any) -> Any:
    """A `Trainer` that trains the projector on (optionally cached) reduced tokens."""
    from safetensors.torch import load_file, save_file
    from transformers import Trainer
    from transformers.utils import SAFE_WEIGHTS_NAME

    class ProjectorTrainer(Trainer):
        def __init__(self, *args: Any, projector: nn.Module, cache: ReducedFeatureCache | None, **rest: Any) -> None:
            super().__init__(*args, **rest)
            self.projector = projector
            self.cache = cache
            self.loss_sum = 0.0  # summed like the Trainer's own running loss, over every step (resumed ones too)

        def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
            loss = super().training_step(*args, **kwargs)
            self.loss_sum += float(loss)
            return loss

        def mean_loss(self) -> float:
            """The mean training loss over all steps of the run, those before a resume included."""
            return self.loss_sum / max(self.state.global_step, 1)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
            keys = inputs.pop(IMAGE_KEYS, None)
            # The frozen parts run as at inference (no dropout): only the projector is in training mode.
            self.model.eval()
            self.projector.train()
            serving = self.cache.serving(keys) if self.cache is not None and keys is not None else nullcontext()
            with serving:
                return super().compute_loss(
                    model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
                )

        def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
            # Checkpoints hold the trained weights only; the frozen rest is the base model's.
            output_dir = output_dir or self.args.output_dir
            os.makedirs(output_dir, exist_ok=True)
            save_file(trainable_state_dict(self.model), os.path.join(output_dir, SAFE_WEIGHTS_NAME))
            record = {"steps": self.state.global_step, "loss_sum": self.loss_sum}
            Path(output_dir, LOSS_FILE).write_text(json.dumps(record) + "\n", encoding="utf-8")

        def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
            file = Path(resume_from_checkpoint) / SAFE_WEIGHTS_NAME
            if not file.is_file():
                raise ValueError(f"cannot resume: no weights in checkpoint {resume_from_checkpoint}")
            expected = [name for name, p in self.model.named_parameters() if p.requires_grad]
            _load_into(self.model, load_file(str(file)), expected, file)
            loss_file = Path(resume_from_checkpoint) / LOSS_FILE
            if not loss_file.is_file():
                raise ValueError(f"cannot resume: no {LOSS_FILE} in checkpoint {resume_from_checkpoint}")
            self.loss_sum = float(json.loads(loss_file.read_text(encoding="utf-8"))["loss_sum"])

    return ProjectorTrainer(**kwargs)


# --- output directory ---------------------------------------------------------------------------


class _RunDirectory:
    """The output directory and the working directory beside it (`OUT.partial`).

    Checkpoints and the finished model are written under the working directory; only a complete
    result is moved into place, so an interrupted run never touches an existing output directory.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output = output_dir
        self.work = output_dir.with_name(output_dir.name + PARTIAL_SUFFIX)
        self.checkpoints = self.work / "checkpoints"
        self.staged = self.work / "result"

    def check(self, resume: bool, overwrite: bool, inputs: Sequence[tuple[str, Any]] = ()) -> None:
        """Refuse an output over an input (always) or over an existing result or interrupted run (unless asked)."""
        refuse_overlap(self.output, inputs)
        refuse_overlap(self.work, inputs, f"the working directory of -o/--output ({PARTIAL_SUFFIX})")
        if self.output.exists() and not overwrite:
            raise FileExistsError(f"output directory exists: {self.output}; pass --overwrite to replace it")
        if self.work.exists() and not resume and not overwrite:
            raise FileExistsError(
                f"an interrupted run is in {self.work}: pass --resume to continue it or --overwrite to start over"
            )

    def check_resumable(self, run: dict[str, Any]) -> None:
        """Resuming needs the interrupted run's settings: refuse early when they differ."""
        run_file = self.work / RUN_FILE
        if not run_file.is_file():
            return
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
        changed = sorted(key for key in set(run) | set(previous) if run.get(key) != previous.get(key))
        if changed:
            raise ValueError(
                f"--resume: the interrupted run in {self.work} used different settings ({', '.join(changed)}); "
                "rerun with the same settings, or pass --overwrite to start over"
            )

    def start(self, run: dict[str, Any], resume: bool) -> str | None:
        """Create the working directory; returns the checkpoint to resume from (or None)."""
        from transformers.trainer_utils import get_last_checkpoint

        if resume and (self.work / RUN_FILE).is_file():
            self.check_resumable(run)
            checkpoint = get_last_checkpoint(str(self.checkpoints)) if self.checkpoints.is_dir() else None
            shutil.rmtree(self.staged, ignore_errors=True)
            return checkpoint
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        (self.work / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        return None

    def finish(self) -> None:
        """Move the staged result into place (replacing the old output last) and drop the working directory."""
        swap_into_place(self.staged, self.output)
        shutil.rmtree(self.work, ignore_errors=True)


# --- the entry point ----------------------------------------------------------------------------


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
    _require_trainer()
    if not isinstance(config, VisionZipConfig):
        raise TypeError(f"config must be a VisionZipConfig, got {type(config).__name__}")
    if config.attention_mass is not None:
        raise ValueError("config.attention_mass: projector fine-tuning takes a fixed budget; set attention_mass=None")
    if not isinstance(output_dir, (str, Path)) or not str(output_dir):
        raise TypeError(f"output_dir must be a directory path, got {output_dir!r}")
    for name, flag in (("resume", resume), ("overwrite", overwrite), ("adapter_only", adapter_only)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if isinstance(model, nn.Module):
        if processor is None:
            raise ValueError("processor is required when model is a loaded model")
        if is_applied(model):
            raise ValueError("model already has VisionZip applied; call vlmzip.remove(model) first")
        model_id = str(getattr(model, "name_or_path", "") or type(model).__name__)
        inputs = [("model", model_id)] if Path(model_id).is_dir() else []
    elif model is None or isinstance(model, (str, Path)):
        model_id = str(Path(model).resolve()) if model is not None else "default"
        inputs = model_inputs(model)
    else:
        raise TypeError(f"model must be a model directory, None or a loaded model, got {type(model).__name__}")
    run_dir = _RunDirectory(Path(output_dir))
    if isinstance(data, (str, Path)):
        inputs.append(("--data", data))
    refuse_overlap(run_dir.output, inputs)  # before reading the data, which may be the output itself
    records, problems, data_fingerprint = _load_records(data, options)
    images = {record.image: record for record in records}.values()
    run_dir.check(resume, overwrite, [*inputs, *((f"image of {_where(r, data)}", r.image) for r in images)])
    # What a resumed run must share with the interrupted one (not how it is computed or reported).
    run = {
        "model": model_id,
        "data": data_fingerprint,
        "config": config.to_dict(),
        "adapter_only": adapter_only,
        **{k: v for k, v in dataclasses.asdict(options).items() if k not in ("cache_features", "on_error")},
    }
    if resume:
        run_dir.check_resumable(run)

    if not isinstance(model, nn.Module):
        model, loaded_processor = load_model(model)
        processor = processor or loaded_processor
    image_token = getattr(processor, "image_token", None)
    if options.prompt_template is not None and image_token and image_token not in options.prompt_template:
        raise ValueError(f"prompt_template must contain the image token {image_token}, got {options.prompt_template!r}")
    with _projector_training(model, config) as (adapter, projector):
        cache = ReducedFeatureCache() if options.cache_features else None
        prepared = _prepare_examples(data, records, processor, options, adapter.reduce, cache, progress)
        problems = problems + prepared.problems
        if cache is not None and not _cache_serves_like_tower(adapter, cache, prepared):
            warnings.warn(
                "cached tower features do not reproduce this model's inputs; running the tower every step", stacklevel=2
            )
            cache = None
        if cache is not None:
            adapter.reduce = cache.reduce  # instance attribute; goes away with the adapter on remove()
            pixels: Callable[[list[int]], torch.Tensor] = cache.stand_in_pixels
        else:
            pixels = _image_loader(processor, prepared.images)
        checkpoint = run_dir.start(run, resume)
        if resume and checkpoint is None:
            warnings.warn(f"no checkpoint to resume from in {run_dir.work}; training from the beginning", stacklevel=2)
        trainer = _make_trainer(
            model=model,
            args=_training_arguments(options, run_dir.checkpoints, progress),
            train_dataset=prepared.examples,
            data_collator=_Collator(_pad_token_id(processor), pixels, with_keys=cache is not None),
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
        train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start

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
    _save_result(model, processor, projector, result, run, adapter_only, run_dir.staged)
    run_dir.finish()
    return result


@contextmanager
def _projector_training(model: nn.Module, config: VisionZipConfig) -> Iterator[tuple[Any, nn.Module]]:
    """VisionZip applied and everything but the projector frozen; the model is handed back as it came."""
    apply(model, config)  # budgets the model cannot take fail here, before anything is written
    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    use_cache = model.config.__dict__.get("use_cache", _UNSET)  # the Trainer sets it
    try:
        adapter = get_state(model).adapter
        if tuple(adapter.image_input_keys) != ("pixel_values",):
            raise ValueError(
                f"model: projector fine-tuning supports families with one pixel tensor per image (LLaVA-1.5); "
                f"{type(model).__name__} takes {list(adapter.image_input_keys)}"
            )
        projector = _projector(adapter)
        model.requires_grad_(False)
        projector.requires_grad_(True)
        yield adapter, projector
    finally:
        remove(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        if use_cache is _UNSET:
            model.config.__dict__.pop("use_cache", None)
        else:
            model.config.use_cache = use_cache
        model.train(was_training)


_UNSET = object()


def _pad_token_id(processor: Any) -> int:
    # Padding is masked out and carries no label: any valid token id will do.
    tokenizer = processor.tokenizer
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def _image_loader(processor: Any, images: Sequence[Path]) -> Callable[[list[int]], torch.Tensor]:
    """pixel_values for image keys, loaded and processed again for every batch (no cache)."""

    def pixels(keys: list[int]) -> torch.Tensor:
        loaded = [load_image(images[key], processor) for key in keys]
        return processor.image_processor(images=loaded, return_tensors="pt")["pixel_values"]

    return pixels


def _training_arguments(options: FinetuneOptions, checkpoints: Path, progress: bool) -> Any:
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=str(checkpoints),
        per_device_train_batch_size=options.batch_size,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps if options.max_steps is not None else -1,
        learning_rate=options.learning_rate,
        lr_scheduler_type=options.scheduler,
        warmup_steps=options.warmup_ratio,  # below 1: a fraction of the total steps
        weight_decay=options.weight_decay,
        optim="adamw_torch",
        logging_steps=options.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=1,  # resume needs the latest only
        seed=options.seed,
        data_seed=options.seed,
        remove_unused_columns=False,  # the collator's batches are exactly what the model takes
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        disable_tqdm=not progress,
        report_to="none",
    )


def _save_result(
    model: nn.Module,
    processor: Any,
    projector: nn.Module,
    result: FinetuneResult,
    run: dict[str, Any],
    adapter_only: bool,
    target: Path,
) -> None:
    from safetensors.torch import save_file

    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    if adapter_only:
        names = _projector_names(model, projector)
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


# --- command line -------------------------------------------------------------------------------


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Fine-tune only the projector on reduced tokens (VisionZip with projector tuning)."
    sub = subcommands.add_parser(
        "finetune",
        help=help_text,
        description=help_text + " The tower and the language model stay frozen; the result is a model directory whose "
        "visionzip_config.json makes vlmzip.apply(model) use the budget it was tuned for.",
    )
    sub.add_argument("--model", help="model directory (default: the embedded default model)")
    sub.add_argument(
        "--data",
        help="VQA JSONL file (image, question, answers per line); default: the embedded model's training split",
    )
    sub.add_argument("-o", "--output", required=True, help="output directory (refused if it exists, see --overwrite)")
    budget = sub.add_argument_group("budget (per image; default 54 + 10)")
    budget.add_argument("--tokens", type=int, help="total tokens, split as the paper does (64 = 54 + 10)")
    budget.add_argument("--dominant", type=int, help="tokens kept by attention ([CLS] included)")
    budget.add_argument("--contextual", type=int, help="merged contextual tokens")
    budget.add_argument("--method", default="visionzip", help="reduction method (default: visionzip)")
    from vlmzip.cli_options import add_position_options

    add_position_options(budget)
    defaults = FinetuneOptions()
    train = sub.add_argument_group("training")
    train.add_argument(
        "--epochs", type=float, default=defaults.epochs, help="passes over the data (default: %(default)s)"
    )
    train.add_argument("--max-steps", type=int, help="optimizer steps in total (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    train.add_argument(
        "--lr", type=float, default=defaults.learning_rate, help="peak learning rate (default: %(default)s)"
    )
    train.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio, help="default: %(default)s")
    train.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.scheduler, help="default: %(default)s")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="default: %(default)s")
    train.add_argument(
        "--save-steps", type=int, default=defaults.save_steps, help="checkpoint interval (default: %(default)s)"
    )
    train.add_argument("--logging-steps", type=int, default=defaults.logging_steps, help="default: %(default)s")
    train.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    train.add_argument("--limit", type=int, help="use the first N records only")
    train.add_argument(
        "--train-images",
        type=int,
        default=DEFAULT_TRAIN_IMAGES,
        help="without --data: scenes of the embedded model's training split (default: %(default)s)",
    )
    train.add_argument(
        "--per-type",
        type=int,
        default=DEFAULT_PER_TYPE,
        help="without --data: questions of each type per scene (default: %(default)s)",
    )
    train.add_argument("--prompt", help="prompt template with {question} (default: the processor's chat template)")
    train.add_argument("--no-cache", action="store_true", help="run the tower every step instead of once per image")
    run = sub.add_argument_group("run")
    run.add_argument("--on-error", choices=("stop", "skip"), default="stop", help="bad rows and images (default: stop)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its latest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output (or interrupted run)")
    run.add_argument("--adapter-only", action="store_true", help="save only the projector weights (small)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars; loss lines only")
    sub.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import tempfile

    from vlmzip.cli import UserError
    from vlmzip.cli_options import config_from_args

    config = config_from_args(args)
    if args.data is not None:
        return _finetune_from_args(args, config, args.data)
    if args.model is not None:
        raise UserError("--data is required with --model (the training split belongs to the embedded model)")
    from vlmzip.default_model.data import export_split

    images = check_int("--train-images", args.train_images, 1)
    per_type = check_int("--per-type", args.per_type, 1)
    _RunDirectory(Path(args.output)).check(args.resume, args.overwrite, model_inputs(args.model))  # before any data
    with tempfile.TemporaryDirectory(prefix="vlmzip-finetune-") as folder:
        # Regenerated identically every time, so a resumed run sees the same data.
        data = export_split(Path(folder) / "train.jsonl", split="train", num_images=images, per_type=per_type)
        return _finetune_from_args(args, config, data)


def _finetune_from_args(args: argparse.Namespace, config: VisionZipConfig, data: str | Path) -> int:
    from vlmzip.cli import UserError

    try:
        _require_trainer()
    except ImportError as error:
        raise UserError(str(error)) from None
    result = finetune_projector(
        args.model,
        data,
        config,
        args.output,
        resume=args.resume,
        overwrite=args.overwrite,
        adapter_only=args.adapter_only,
        progress=not args.no_progress,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio,
        scheduler=args.scheduler,
        weight_decay=args.weight_decay,
        save_steps=args.save_steps,
        logging_steps=args.logging_steps,
        seed=args.seed,
        cache_features=not args.no_cache,
        on_error=args.on_error,
        prompt_template=args.prompt,
        limit=args.limit,
    )
    for problem in result.problems:
        print(f"skipped: {problem}")
    print(
        f"fine-tuned the projector for {config.dominant} + {config.contextual} tokens on {result.examples} "
        f"examples ({result.images} images): {result.steps} steps, mean loss {result.train_loss:.4f}, "
        f"{result.precompute_seconds:.0f} s preparing + {result.train_seconds:.0f} s training -> {result.output_dir}"
    )
    return 0
