"""Training data: records read and checked, each image loaded and tokenised once, batches collated.

The first accepted answer of each record is the training target.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vlmzip.adapters.base import IGNORE_INDEX
from vlmzip.core import Reduction
from vlmzip.data import DataError, VQARecord, load_vqa_jsonl
from vlmzip.finetune.cache import ReducedFeatureCache
from vlmzip.finetune.examples import Example, encode_image_examples
from vlmzip.finetune.options import IMAGE_KEYS, TOWER_BATCH, FinetuneOptions
from vlmzip.loading import load_image


def load_records(data: Any, options: FinetuneOptions) -> tuple[list[VQARecord], list[str], str]:
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


def where(record: VQARecord, data: Any) -> str:
    """Where a record came from, for messages: the file and line, or the record's line."""
    return f"{data}:{record.line}" if isinstance(data, (str, Path)) else f"record at line {record.line}"


@dataclass
class Prepared:
    """The training examples, their images (index = cache key), skipped rows and the time it took."""

    examples: list[Example]
    images: list[Path]
    problems: list[str]
    seconds: float
    cpu_seconds: float
    first_pixels: torch.Tensor | None = None  # pixel_values of images[0], for the cache's self-check


def prepare_examples(
    data: Any,
    records: Sequence[VQARecord],
    processor: Any,
    options: FinetuneOptions,
    reduce: Callable[[torch.Tensor], tuple[Any, Reduction]] | None,
    cache: ReducedFeatureCache | None,
    progress: bool,
) -> Prepared:
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
            message = f"{where(group[0], data)}: {error}"
            if options.on_error == "stop":
                raise DataError(message) from None
            problems.extend(f"{where(r, data)}: {error}" for r in group)
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
    return Prepared(examples, images, problems, seconds, cpu_seconds, first_pixels)


class Collator:
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


def padding_id(processor: Any) -> int:
    # Padding is masked out and carries no label: any valid token id will do.
    tokenizer = processor.tokenizer
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


def image_loader(processor: Any, images: Sequence[Path]) -> Callable[[list[int]], torch.Tensor]:
    """pixel_values for image keys, loaded and processed again for every batch (no cache)."""

    def pixels(keys: list[int]) -> torch.Tensor:
        loaded = [load_image(images[key], processor) for key in keys]
        return processor.image_processor(images=loaded, return_tensors="pt")["pixel_values"]

    return pixels
