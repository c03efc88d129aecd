"""lmms-eval plugin: run any lmms-eval task on a local LLaVA-family model with VisionZip.

Installed with the `[eval]` extra, lmms-eval (>= 0.6) finds the model through the `lmms_eval.models`
entry point (`manifests()` below), so no lmms-eval source is touched:

    lmms-eval --model visionzip_llava \\
        --model_args pretrained=DIR,dominant=54,contextual=10 --tasks pope --batch_size 4

model_args:
    pretrained: local model directory of a family vlmzip supports; "default" (or left out) for
        the embedded default model. Nothing is downloaded.
    dominant, contextual: the budget per image (default 54 + 10); or tokens=N for the paper's split.
    method: visionzip (default), any other reduction method, "fastv", or "full" for no reduction.
    device (cpu), dtype (float32), batch_size (1), max_new_tokens (default for tasks that set none: 128).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

MODEL_ID = "visionzip_llava"


def manifests() -> list[Any]:
    """The `lmms_eval.models` entry point: one manifest naming the model class below."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.VisionZipLlava")]


def _batches(requests: Sequence[Instance], size: int) -> Iterator[list[tuple[int, Instance]]]:
    """Requests grouped by identical generation arguments, in order, `size` at a time."""
    groups: dict[str, list[tuple[int, Instance]]] = {}
    for index, request in enumerate(requests):
        key = json.dumps(request.args[1], sort_keys=True, default=str) if isinstance(request.args[1], dict) else ""
        groups.setdefault(key, []).append((index, request))
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


class VisionZipLlava(lmms):
    """A local LLaVA-family model (transformers 5) answering lmms-eval requests with VisionZip applied."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        dominant: int | None = None,
        contextual: int | None = None,
        tokens: int | None = None,
        method: str = "visionzip",
        device: str = "cpu",
        dtype: str = "float32",
        batch_size: int | str = 1,
        max_new_tokens: int = 128,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"model_args: unknown arguments {sorted(unknown)}")
        import vlmzip
        from vlmzip.cli_options import dtype_named
        from vlmzip.config import check_int
        from vlmzip.loading import load_model
        from vlmzip.variants import VariantRunner, single_variant, unit_tokens

        try:
            variant = single_variant(method, tokens, dominant, contextual)
            torch_dtype = dtype_named(dtype, "dtype")
        except ValueError as error:
            raise ValueError(f"model_args: {error}") from None
        self.batch_size_per_gpu = check_int("batch_size", int(batch_size), 1)
        self.max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1)
        path = None if pretrained in (None, "", "default") else str(pretrained)
        model, processor = load_model(path, dtype=torch_dtype)
        self._device = torch.device(device)
        self.model = model.to(self._device).eval()
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.tokenizer.padding_side = "left"
        self.method = method
        self.variant = variant
        units = unit_tokens(self.model, processor=processor) if VariantRunner.needs_unit_tokens([variant]) else None
        self.runner = VariantRunner(self.model, variant, units)  # validates the budget against the model
        if self.runner.reduces_before_llm:
            vlmzip.apply(self.model, variant.config())  # the loaded model carries the reduction it is evaluated with

    # --- what lmms-eval asks of a model ------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _prompt(self, context: str, images: int) -> str:
        """The model's chat template around the images and the task's text (LLaVA-1.5 style without one)."""
        from vlmzip.prompts import QUESTION_FIELD, build_prompt

        image_token = getattr(self.processor, "image_token", "<image>")
        if image_token in context:
            images = 0  # the task placed its image tokens itself
        template = None
        if not getattr(self.processor, "chat_template", None):
            template = "USER: " + f"{image_token}\n" * images + f"{QUESTION_FIELD} ASSISTANT:"
        return build_prompt(self.processor, context, images, template)

    def _visuals(self, request: Instance) -> list[Any]:
        doc_to_visual, doc_id, task, split = request.args[2:6]
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual is not None else []
        from vlmzip.images import load_image

        return [load_image(visual, self.processor) for visual in (visuals or [])]

    def _encode(self, texts: list[str], images: list[Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        inputs = self.processor(**kwargs).to(self._device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from tqdm import tqdm

        results: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="visionzip_llava")
        for batch in _batches(requests, self.batch_size):
            generation = dict(batch[0][1].args[1] or {})
            until = generation.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            temperature = float(generation.get("temperature", 0) or 0)
            sampling = bool(generation.get("do_sample", False)) and temperature > 0
            images, texts = [], []
            for _, request in batch:
                visuals = self._visuals(request)
                images += visuals
                texts.append(self._prompt(request.args[0], len(visuals)))
            inputs = self._prepared(self._encode(texts, images))
            with torch.inference_mode(), self.runner.generating():
                output = self.model.generate(
                    **inputs,
                    max_new_tokens=int(generation.get("max_new_tokens", self.max_new_tokens)),
                    do_sample=sampling,
                    temperature=temperature if sampling else None,
                    top_p=generation.get("top_p") if sampling else None,
                    num_beams=int(generation.get("num_beams", 1) or 1),
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            answers = self.tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for (index, request), answer in zip(batch, answers, strict=True):
                for stop in until:
                    if stop and stop in answer:
                        answer = answer[: answer.index(stop)]
                results[index] = answer.strip()
                self.cache_hook.add_partial("generate_until", (request.args[0], generation), answer)
            progress.update(len(batch))
        progress.close()
        return [answer or "" for answer in results]

    def _prepared(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """The images encoded as the variant hands them over (reduced: the answer starts after the shorter prompt)."""
        if inputs.get("pixel_values") is None:
            return dict(inputs)
        with torch.inference_mode():
            return self.runner.prepare(inputs)

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """Sum of the continuation's token log-probabilities, and whether greedy decoding would produce it."""
        if self.variant.inside_llm:
            raise NotImplementedError(
                f"method={self.method} prunes inside the language model: loglikelihood tasks need logits at every "
                "position"
            )
        results = []
        for request in requests:
            context, continuation = request.args[0], request.args[1]
            if not isinstance(continuation, str):
                doc_id, task, split = request.args[3:6]
                continuation = continuation(self.task_dict[task][split][doc_id])
            visuals = self._visuals(request)
            prompt = self._prompt(context, len(visuals))
            whole = self._encode([prompt + continuation], visuals)
            prefix = self._encode([prompt], visuals)
            count = whole["input_ids"].shape[1] - prefix["input_ids"].shape[1]
            whole = self._prepared(whole)
            with torch.inference_mode():
                logits = self.model(**whole).logits[0, -count - 1 : -1].float()
            targets = whole["input_ids"][0, -count:]
            log_probs = logits.log_softmax(dim=-1)
            total = float(log_probs.gather(1, targets[:, None]).sum())
            results.append((total, bool((logits.argmax(dim=-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("visionzip_llava answers single-round tasks (generate_until, loglikelihood)")
