"""`vlmzip demo`: one image and question, all tokens vs VisionZip, side by side.

Both runs go through the same model and the same hand-over to the language model
(`mm_encoder_outputs`); only the visual tokens differ. Timings are medians of interleaved repeats.
A follow-up question about the same image is then answered with VisionZip from an `ImageCache`:
the reduced tokens do not depend on the question, so it skips the vision tower and only the
language model runs.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from vlmzip.adapters import adapter_class_for
from vlmzip.adapters.base import Adapter, prepare_unreduced
from vlmzip.cache import ImageCache
from vlmzip.cli_options import add_budget_options, config_from_args
from vlmzip.compat import output_cache
from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction
from vlmzip.images import load_image
from vlmzip.measure import PeakMemory, kv_cache_bytes_after_prefill, timed
from vlmzip.prompts import build_prompt

DEFAULT_FOLLOW_UP = "how many objects are there?"
DEFAULT_PICTURE = "vlmzip-demo.png"  # where `vlmzip demo` draws the kept tokens unless told otherwise


@dataclass
class DemoRun:
    label: str
    visual_tokens: int  # per image, reaching the language model
    answer: str
    vision_ms: float  # tower (+ selection) + projector
    prefill_ms: float  # language model, features ready -> first-token logits
    peak_mb: float  # rise during the prefill: exact on CUDA, a sampled-RSS lower bound on CPU
    kv_cache_mb: float | None  # keys and values held after the prefill

    @property
    def first_token_ms(self) -> float:
        return self.vision_ms + self.prefill_ms


@dataclass
class FollowUp:
    """A second question about the same image, its reduced tokens taken from the image cache."""

    question: str
    answer: str
    vision_ms: float  # cache lookup (hashing the pixels): no tower, no selection
    prefill_ms: float
    cache_hits: int

    @property
    def first_token_ms(self) -> float:
        return self.vision_ms + self.prefill_ms


@dataclass
class DemoResult:
    full: DemoRun
    reduced: DemoRun
    reduction: Reduction
    config: VisionZipConfig
    follow_up: FollowUp | None = None


def _answer(model: Any, processor: Any, prepared: dict[str, Any], max_new_tokens: int) -> str:
    prompt_length = prepared["input_ids"].shape[1]
    with torch.inference_mode():
        output = model.generate(**prepared, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0].strip()


def run_demo(
    model: Any,
    processor: Any,
    image: Image.Image,
    question: str,
    config: VisionZipConfig,
    *,
    repeats: int = 3,
    max_new_tokens: int = 16,
    progress: Callable[[str], None] = lambda message: None,
    follow_up: str | None = None,
    cache: ImageCache | None = None,
) -> DemoResult:
    """Measure the model on (image, question) with all visual tokens and with `config`'s reduction.

    `follow_up`: a second question about the image, answered with the reduction from an image cache
    that the first answer filled (`DemoResult.follow_up`, with its time to first token).
    `cache`: the image cache the answers go through (default: a fresh one); the timed rounds never use it.
    """
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    if follow_up is not None and (not isinstance(follow_up, str) or not follow_up.strip()):
        raise ValueError("follow_up must be None or a non-empty string")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    # Validates the budget against the processor's geometry; the model stays unpatched.
    adapter: Adapter = adapter_class_for(model)(model, config, processor)
    image = load_image(image, processor)  # any mode as RGB; refused if the processor would blow it up
    device = next(model.parameters()).device
    inputs = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt").to(device)

    encoders: dict[str, Callable[[], dict[str, Any]]] = {
        "full": lambda: prepare_unreduced(model, inputs),
        "zip": lambda: adapter.prepare(inputs),
    }
    times: dict[str, dict[str, list[float]]] = {name: {"vision": [], "prefill": [], "peak": []} for name in encoders}
    kv_cache_mb: dict[str, float | None] = {}
    with torch.inference_mode():
        for repeat in range(repeats + 1):  # the first round warms up and is not counted
            progress(f"measuring (round {repeat + 1} of {repeats + 1})")
            for name in ("full", "zip") if repeat % 2 == 0 else ("zip", "full"):
                prepared, vision_ms = timed(encoders[name])
                with PeakMemory(device) as memory:
                    output, prefill_ms = timed(partial(model, **prepared, logits_to_keep=1, use_cache=True))
                kv_bytes = kv_cache_bytes_after_prefill(output_cache(output), generated=1)
                kv_cache_mb[name] = kv_bytes / 2**20 if kv_bytes is not None else None
                if repeat:
                    times[name]["vision"].append(vision_ms)
                    times[name]["prefill"].append(prefill_ms)
                    times[name]["peak"].append(memory.delta_mb)
    reduction = adapter.last_encoded.reductions[0]

    progress("answering")
    cache = cache if cache is not None else ImageCache(max_bytes=2**30)
    encoders["zip"] = lambda: adapter.prepare(inputs, cache=cache)  # the answer fills the cache
    runs = {}
    for name, label in (("full", "all tokens"), ("zip", f"{config.method} {config.dominant}+{config.contextual}")):
        fresh = encoders[name]()
        runs[name] = DemoRun(
            label=label,
            visual_tokens=int((fresh["input_ids"] == adapter.image_token_id).sum()),
            answer=_answer(model, processor, fresh, max_new_tokens),
            vision_ms=statistics.median(times[name]["vision"]),
            prefill_ms=statistics.median(times[name]["prefill"]),
            peak_mb=max(times[name]["peak"]),
            kv_cache_mb=kv_cache_mb[name],
        )
    result = DemoResult(full=runs["full"], reduced=runs["zip"], reduction=reduction, config=config)
    if follow_up is not None:
        progress("answering the follow-up question from the image cache")
        result.follow_up = answer_from_cache(model, processor, adapter, cache, image, follow_up, max_new_tokens)
    return result


def answer_from_cache(
    model: Any, processor: Any, adapter: Adapter, cache: ImageCache, image: Image.Image, question: str, max_new: int
) -> FollowUp:
    """Answer `question` about `image` with `adapter`'s reduction through `cache`, timing the first token."""
    device = next(model.parameters()).device
    inputs = processor(images=[image], text=[build_prompt(processor, question)], return_tensors="pt").to(device)
    hits = cache.hits
    with torch.inference_mode():
        prepared, vision_ms = timed(lambda: adapter.prepare(inputs, cache=cache))
        _, prefill_ms = timed(partial(model, **prepared, logits_to_keep=1, use_cache=True))
    answer = _answer(model, processor, prepared, max_new)
    return FollowUp(question, answer, vision_ms, prefill_ms, cache.hits - hits)


def render_table(result: DemoResult, question: str) -> Any:
    from rich.table import Table

    full, reduced = result.full, result.reduced
    table = Table(title=f"Q: {question}", title_justify="left")
    table.add_column("")
    table.add_column(full.label, justify="right")
    table.add_column(reduced.label, justify="right")
    table.add_column("ratio", justify="right")

    def speedup(before: float, after: float) -> str:
        return f"{before / after:.2f}x faster" if after > 0 else "-"

    table.add_row("answer", full.answer, reduced.answer, "same" if full.answer == reduced.answer else "differs")
    table.add_row(
        "visual tokens to the LLM",
        str(full.visual_tokens),
        str(reduced.visual_tokens),
        f"{full.visual_tokens / max(1, reduced.visual_tokens):.1f}x fewer",
    )
    table.add_row(
        "vision tower (+ selection), ms",
        f"{full.vision_ms:.1f}",
        f"{reduced.vision_ms:.1f}",
        speedup(full.vision_ms, reduced.vision_ms),
    )
    table.add_row(
        "LLM prefill, ms",
        f"{full.prefill_ms:.1f}",
        f"{reduced.prefill_ms:.1f}",
        speedup(full.prefill_ms, reduced.prefill_ms),
    )
    table.add_row(
        "time to first token, ms",
        f"{full.first_token_ms:.1f}",
        f"{reduced.first_token_ms:.1f}",
        speedup(full.first_token_ms, reduced.first_token_ms),
    )
    if full.kv_cache_mb and reduced.kv_cache_mb:
        table.add_row(
            "KV cache after prefill, MB",
            f"{full.kv_cache_mb:.2f}",
            f"{reduced.kv_cache_mb:.2f}",
            f"{full.kv_cache_mb / reduced.kv_cache_mb:.1f}x smaller",
        )

    def megabytes(value: float) -> str:  # CPU RSS has page granularity: tiny models stay below it
        return f"{value:.1f}" if value >= 0.05 else "< 0.1"

    table.add_row("prefill peak memory rise, MB", megabytes(full.peak_mb), megabytes(reduced.peak_mb), "")
    return table


def render_follow_up(result: DemoResult) -> str:
    """Lines for the follow-up question: its answer and time to first token against the first question's."""
    follow_up = result.follow_up
    if follow_up is None:
        return ""
    source = "from the image cache" if follow_up.cache_hits else "encoded again (not found in the cache)"
    reduced = result.reduced
    return (
        f"follow-up Q: {follow_up.question}\n"
        f"  answer ({reduced.label}, image {source}): {follow_up.answer}\n"
        f"  time to first token: {follow_up.first_token_ms:.1f} ms (lookup {follow_up.vision_ms:.1f} ms + "
        f"prefill {follow_up.prefill_ms:.1f} ms), vs {reduced.first_token_ms:.1f} ms for the first question "
        f"with {reduced.label} and {result.full.first_token_ms:.1f} ms with all tokens"
    )


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from vlmzip.loading import load_model

    console = Console()
    config = config_from_args(args)
    if args.question is not None and not args.question.strip():
        raise ValueError("--question must not be empty")
    if args.max_new_tokens < 1 or args.repeats < 1:
        raise ValueError("--max-new-tokens and --repeats must be >= 1")
    follow_up = args.follow_up if args.follow_up is not None else DEFAULT_FOLLOW_UP
    if not follow_up.strip():
        raise ValueError("--follow-up must not be empty (use --no-follow-up to skip it)")
    # The default picture never replaces a file the user has there; an explicit -o does.
    output = args.output or DEFAULT_PICTURE
    kept_existing = args.output is None and not args.overwrite and Path(output).exists()
    if not kept_existing:
        from vlmzip.outputs import model_inputs, refuse_overlap

        refuse_overlap(output, [("--image", args.image), *model_inputs(args.model)])
    image = load_image(args.image) if args.image else None  # fail on a bad image before loading the model

    with console.status("loading model") as status:
        model, processor = load_model(args.model)
        question, image_path, expected = args.question, args.image, None
        if image is None or question is None:
            if args.model is not None:
                raise ValueError("--image and --question are required with --model")
            from vlmzip.default_model import DEMO_SAMPLE, sample_inputs

            sample = sample_inputs()[DEMO_SAMPLE]
            if image is None:
                image, image_path = sample["image"], sample["image_path"]
            question = question or sample["question"]
            if args.image is None and args.question is None:
                expected = sample["answer"]
        result = run_demo(
            model,
            processor,
            image,
            question,
            config,
            repeats=args.repeats,
            max_new_tokens=args.max_new_tokens,
            progress=lambda message: status.update(message),
            follow_up=None if args.no_follow_up else follow_up,
        )
    console.print(f"image: {image_path}")
    if expected is not None:
        console.print(f"expected answer (bundled sample): {expected}")
    console.print(render_table(result, question))
    if result.follow_up is not None:
        console.print(render_follow_up(result), highlight=False)
    if kept_existing:
        console.print(f"kept tokens not drawn: {output} exists (--overwrite replaces it, -o PATH writes elsewhere)")
    else:
        from vlmzip.outputs import save_image
        from vlmzip.viz import visualize

        console.print(f"kept tokens drawn on the image: {save_image(visualize(image, result.reduction), output)}")
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Answer one question with all visual tokens and with VisionZip; print answers, tokens, timings."
    parser = subcommands.add_parser(
        "demo",
        help=help_text,
        description=help_text + " Runs on the embedded default model and a bundled sample unless told otherwise.",
    )
    parser.add_argument("--image", help="image file (default: a bundled sample scene)")
    parser.add_argument("--question", help="question about the image (default: the sample's question)")
    parser.add_argument("--model", help="local model directory of a supported family (default: the embedded model)")
    add_budget_options(parser)
    parser.add_argument(
        "--follow-up",
        help=f"a second question about the image, answered from the image cache (default {DEFAULT_FOLLOW_UP!r})",
    )
    parser.add_argument("--no-follow-up", action="store_true", help="skip the follow-up question")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="answer length limit (default 16)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds, interleaved (default 3)")
    parser.add_argument(
        "-o",
        "--output",
        help=f"where to draw the kept tokens (default {DEFAULT_PICTURE}, which is not overwritten if it exists)",
    )
    parser.add_argument("--overwrite", action="store_true", help=f"replace an existing {DEFAULT_PICTURE}")
    parser.set_defaults(run=_run)
