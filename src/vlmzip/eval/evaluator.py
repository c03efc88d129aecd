"""Accuracy of every variant (method x budget) on a set of VQA items, greedy and batched.

The vision tower's output does not depend on the method, so on LLaVA-1.5-style models (one tower
pass per image, `LlavaAdapter`) each image is probed once and its full-length projected features
are kept: every method is then applied to the cached probe and only the language model runs per
variant. Other families go through their adapter's own `prepare` for every batch (same results,
more tower passes). Answers are scored by exact match (`vlmzip.data.is_correct`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmzip.adapters import adapter_class_for
from vlmzip.adapters.llava import LlavaAdapter
from vlmzip.bench.variants import Variant, VariantRunner, unit_tokens
from vlmzip.config import VisionZipConfig, check_int
from vlmzip.core import Reduction
from vlmzip.data import is_correct
from vlmzip.eval.items import EvalItem, EvalSet
from vlmzip.probe import ProbeOutput, probe_vision_tower


@dataclass
class VariantAccuracy:
    variant: Variant
    tokens: int  # visual tokens per image reaching the language model (after layer K for FastV)
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

    def row(self) -> dict[str, Any]:
        return {
            "method": self.variant.method,
            "budget": self.variant.budget,
            "tokens": self.tokens,
            "accuracy": self.accuracy,
            "n": self.n,
            "correct": self.correct,
            "per_type": {kind: c / n for kind, (c, n) in sorted(self.per_type.items())},
            "per_type_n": {kind: n for kind, (_, n) in sorted(self.per_type.items())},
        }


def _cat_probes(probes: Sequence[ProbeOutput]) -> ProbeOutput:
    first = probes[0]
    return ProbeOutput(
        features=torch.cat([p.features for p in probes]),
        scores=torch.cat([p.scores for p in probes]),
        keys=torch.cat([p.keys for p in probes]),
        has_cls=first.has_cls,
        num_prefix_tokens=first.num_prefix_tokens,
        grid=first.grid,
    )


class Evaluator:
    """Runs variants over an `EvalSet` with one model and processor.

    prompt: builds the text for one question (the image placeholder included).
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
        self.reference = adapter_class_for(model)(model, VisionZipConfig(dominant=1, contextual=0))
        # Probes and full-length projected features per image key, filled on first use.
        self.cached = type(self.reference) is LlavaAdapter
        self._probes: dict[str, ProbeOutput] = {}
        self._full: dict[str, torch.Tensor] = {}
        self._texts: dict[int, dict[str, Any]] = {}  # batch start -> token ids and mask (batches never change)
        self._pixel_shape: tuple[int, ...] = ()
        self._unit_tokens: int | None = None  # tower tokens per image at the processor's resolution

    # --- encoding ------------------------------------------------------------------------------
    def _processed(self, batch: Sequence[EvalItem]) -> dict[str, Any]:
        texts = [self.prompt(item.question) for item in batch]
        # One list per sample: processors of tiled models (SmolVLM) need the nesting with a batch of prompts.
        images = [[self.data.load_image(item.image_key)] for item in batch]
        return dict(self.processor(images=images, text=texts, return_tensors="pt", padding=True).to(self.device))

    def _cached_inputs(self, start: int, batch: Sequence[EvalItem]) -> dict[str, Any]:
        """The batch's token ids with a same-shaped stand-in for pixel_values (never read: probes are cached)."""
        if start not in self._texts:
            inputs = self._processed(batch)
            pixel_values = inputs.pop("pixel_values")
            self._texts[start] = inputs
            self._pixel_shape = tuple(pixel_values.shape[1:])
            first_row = {}
            for row, item in enumerate(batch):
                if item.image_key not in self._probes:
                    first_row.setdefault(item.image_key, row)
            if first_row:
                self._encode(list(first_row), pixel_values[list(first_row.values())])
        inputs = dict(self._texts[start])
        stand_in = torch.zeros((), dtype=self.model.dtype, device=self.device)
        inputs["pixel_values"] = stand_in.expand(len(batch), *self._pixel_shape)
        return inputs

    def _encode(self, keys: list[str], pixel_values: torch.Tensor) -> None:
        """Probe the tower once for these images and keep their probes and full-length projected features."""
        adapter = self.reference
        with torch.inference_mode():
            probe = probe_vision_tower(adapter.vision_tower(), pixel_values.to(self.model.dtype), adapter.feature_layer)
            # What LlavaModel.get_image_features feeds the projector: the feature layer, [CLS] dropped by "default".
            start = 1 if adapter._drops_cls() else 0
            full = adapter.projector()(probe.features[:, start:])
        for index, key in enumerate(keys):
            self._probes[key] = ProbeOutput(
                features=probe.features[index : index + 1],
                scores=probe.scores[index : index + 1],
                keys=probe.keys[index : index + 1],
                has_cls=probe.has_cls,
                num_prefix_tokens=probe.num_prefix_tokens,
                grid=probe.grid,
            )
            self._full[key] = full[index]

    def _prepare(self, runner: VariantRunner, start: int, batch: Sequence[EvalItem]) -> dict[str, Any]:
        if not self.cached:
            return runner.prepare(self._processed(batch))
        keys = [item.image_key for item in batch]
        inputs = self._cached_inputs(start, batch)
        adapter = runner.adapter
        if adapter is None:  # full features (the full-token model, or FastV, which prunes later)
            inputs.pop("pixel_values")
            inputs["mm_encoder_outputs"] = {
                "image": BaseModelOutputWithPooling(pooler_output=[self._full[k] for k in keys])
            }
            return inputs
        probe = _cat_probes([self._probes[key] for key in keys])

        def cached_reduce(pixel_values: torch.Tensor, **tower_kwargs: Any) -> tuple[ProbeOutput, Reduction]:
            return probe, adapter.method(probe, adapter.config)

        adapter.reduce = cached_reduce  # instance attribute: this adapter belongs to the evaluation only
        try:
            return adapter.prepare(inputs)
        finally:
            del adapter.reduce

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
                prepared = self._prepare(runner, start, batch)
                with runner.generating():
                    output = self.model.generate(
                        **prepared,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
            if result is None:
                result = VariantAccuracy(variant, self._visual_tokens(runner, prepared))
            answers = self.tokenizer.batch_decode(output[:, prepared["input_ids"].shape[1] :], skip_special_tokens=True)
            for item, answer in zip(batch, answers, strict=True):
                result.add(item, answer.strip().split("\n")[0])
            if progress is not None:
                progress(len(batch))
        assert result is not None  # an EvalSet always holds items
        return result

    def _visual_tokens(self, runner: VariantRunner, prepared: dict[str, Any]) -> int:
        ids = torch.tensor(self.reference.placeholder_token_ids, device=self.device)
        input_ids = prepared["input_ids"]
        if runner.fastv is not None and runner.fastv.last_kept is not None:
            input_ids = input_ids.gather(1, runner.fastv.last_kept.to(self.device))  # what layers >= K keep
        return int(torch.isin(input_ids[0], ids).sum())
