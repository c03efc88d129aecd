"""Accuracy of every variant (method x budget) on a set of VQA items, greedy and batched.

A reduced image does not depend on the question, so with an `ImageCache` (the default of `vlmzip
eval`) each image of a variant is encoded once however many questions ask about it: later
questions reuse its reduced tokens and only the language model runs. The full-token model and
FastV encode every batch. Answers are scored by exact match (`vlmzip.data.is_correct`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from vlmzip.adapters import geometry_of
from vlmzip.cache import ImageCache, check_cache
from vlmzip.config import check_int
from vlmzip.data import is_correct
from vlmzip.eval.items import EvalItem, EvalSet
from vlmzip.images import load_image
from vlmzip.variants import Variant, VariantRunner, unit_tokens


@dataclass
class VariantAccuracy:
    variant: Variant
    token_counts: list[int] = field(default_factory=list)  # visual tokens of each sample (after layer K: FastV)
    correct: int = 0
    n: int = 0
    per_type: dict[str, list[int]] = field(default_factory=dict)  # type -> [correct, n]
    predictions: list[str] = field(default_factory=list)  # in item order

    def add(self, item: EvalItem, prediction: str) -> bool:
        self.predictions.append(prediction)
        hit = is_correct(prediction, item.answers)
        self.correct += hit
        self.n += 1
        counts = self.per_type.setdefault(item.type, [0, 0])
        counts[0] += hit
        counts[1] += 1
        return hit

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def tokens(self) -> float:
        """Mean visual tokens per sample (an int when every sample got the same number)."""
        counts = self.token_counts
        if not counts:
            return 0
        return counts[0] if min(counts) == max(counts) else sum(counts) / len(counts)

    def row(self) -> dict[str, Any]:
        counts = torch.tensor(self.token_counts or [0], dtype=torch.float64)
        return {
            "method": self.variant.method,
            "budget": self.variant.budget,
            "positions": self.variant.positions,
            "attention_mass": self.variant.attention_mass,
            "tokens": self.tokens,
            "tokens_std": float(counts.std(unbiased=False)),
            "tokens_min": int(counts.min()),
            "tokens_max": int(counts.max()),
            "accuracy": self.accuracy,
            "n": self.n,
            "correct": self.correct,
            "per_type": {kind: c / n for kind, (c, n) in sorted(self.per_type.items())},
            "per_type_n": {kind: n for kind, (_, n) in sorted(self.per_type.items())},
        }


class Evaluator:
    """Runs variants over an `EvalSet` with one model and processor.

    prompt: builds the text for one question (the image placeholder included).
    image_cache: reduced variants look every image up there first (None: encode every batch).
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any,
        data: EvalSet,
        *,
        prompt: Callable[[str], str],
        batch_size: int = 16,
        max_new_tokens: int = 8,
        image_cache: ImageCache | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        self.data = data
        self.prompt = prompt
        self.batch_size = check_int("batch_size", batch_size, 1)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        self.device = next(model.parameters()).device
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self.geometry = geometry_of(model, processor)
        self.image_cache = check_cache(image_cache)
        self._unit_tokens: int | None = None  # tower tokens per image at the processor's resolution

    # --- encoding ------------------------------------------------------------------------------
    def _processed(self, batch: Sequence[EvalItem]) -> dict[str, Any]:
        texts = [self.prompt(item.question) for item in batch]
        # One list per sample: processors of tiled models (SmolVLM) need the nesting with a batch of prompts.
        images = [[load_image(self.data.load_image(item.image_key), self.processor)] for item in batch]
        return dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device))

    def _prepare(self, runner: VariantRunner, batch: Sequence[EvalItem]) -> dict[str, Any]:
        return runner.prepare(self._processed(batch), cache=self.image_cache)

    # --- running -------------------------------------------------------------------------------
    def evaluate(self, variant: Variant, progress: Callable[[int], None] | None = None) -> VariantAccuracy:
        """Accuracy of one variant over every item; `progress(questions_done)` after each batch."""
        if self._unit_tokens is None and VariantRunner.needs_unit_tokens([variant]):
            self._unit_tokens = unit_tokens(self.model, self._processed(self.data.items[:1]))
        runner = VariantRunner(self.model, variant, self._unit_tokens)
        items = self.data.items
        result: VariantAccuracy | None = None
        for start in range(0, len(items), self.batch_size):
            batch = items[start : start + self.batch_size]
            with torch.inference_mode():
                prepared = self._prepare(runner, batch)
                with runner.generating():
                    output = self.model.generate(
                        **prepared,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
            if result is None:
                result = VariantAccuracy(variant)
            result.token_counts.extend(self._visual_tokens(runner, prepared))
            answers = self.tokenizer.batch_decode(output[:, prepared["input_ids"].shape[1] :], skip_special_tokens=True)
            for item, answer in zip(batch, answers, strict=True):
                result.add(item, answer.strip().split("\n")[0])
            if progress is not None:
                progress(len(batch))
        assert result is not None  # an EvalSet always holds items
        return result

    def _visual_tokens(self, runner: VariantRunner, prepared: dict[str, Any]) -> list[int]:
        """Visual tokens of every sample of a prepared batch (one image per item)."""
        ids = torch.tensor(self.geometry.placeholder_token_ids, device=self.device)
        input_ids = prepared["input_ids"]
        if runner.pruner is not None and runner.pruner.last_kept is not None:
            input_ids = input_ids.gather(1, runner.pruner.last_kept.to(self.device))  # what layers >= K keep
        return torch.isin(input_ids, ids).sum(dim=1).tolist()
