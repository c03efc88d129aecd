"""`vlmzip bench`: speed, memory and FLOPs of every method at every budget against all tokens."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from vlmzip.bench.report import row_label, tokens_cell
from vlmzip.cli_options import (
    DTYPE_NAMES,
    add_variant_options,
    check_device,
    dtype_named,
    load_model_for_cli,
    variants_from_args,
)
from vlmzip.variants import DEFAULT_BUDGETS

DEFAULT_QUESTION = "What is shown in the image?"
# Later questions of --questions-per-image, after the first one (numbered when more are asked).
FOLLOW_UP_QUESTIONS = (
    "How many objects are there?",
    "What colour is the largest object?",
    "Is there anything in the top left corner?",
    "Describe it briefly.",
)


def questions_for(first: str, count: int) -> list[str]:
    """`count` different questions: `first`, then the follow-ups (numbered once they run out)."""
    questions = [first]
    while len(questions) < count:
        index = len(questions) - 1
        follow_up = FOLLOW_UP_QUESTIONS[index % len(FOLLOW_UP_QUESTIONS)]
        questions.append(follow_up if index < len(FOLLOW_UP_QUESTIONS) else f"{follow_up} ({index + 1})")
    return questions


def synthetic_image(size: int = 336) -> Any:
    """A deterministic picture with some structure (gradient and shapes): speed does not depend on content."""
    import numpy as np
    from PIL import Image, ImageDraw

    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.tile(ramp, (size, 1)), np.tile(ramp[:, None], (1, size))], -1)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for index, colour in enumerate(["red", "blue", "yellow", "white"]):
        offset = 40 + 70 * index
        draw.ellipse([offset, offset, offset + 50, offset + 50], fill=colour)
    return image


def load_subject(args: argparse.Namespace) -> tuple[Any, Any, str, list[int], Any, str]:
    """(model, processor, name, default budgets, image, question) as the arguments ask."""
    dtype = dtype_named(args.dtype) if args.dtype else None
    image, question, image_size = None, args.question, 336
    if args.arch is not None:
        from vlmzip.bench.arch import ARCHS, build_arch

        spec = ARCHS.get(args.arch)
        if spec is None:
            raise ValueError(f"--arch must be one of {sorted(ARCHS)}, got {args.arch!r}")
        model, processor = build_arch(
            args.arch, dtype or torch.bfloat16, device=args.device, shared_layers=args.shared_layer_weights
        )
        name, budgets, image_size = args.arch, list(spec.budgets), spec.image_size
    else:
        alternatives = "--model DIR or --arch NAME"
        model, processor = load_model_for_cli(args.model, dtype=dtype or torch.float32, alternatives=alternatives)
        name, budgets = (str(args.model) if args.model else "default model"), list(DEFAULT_BUDGETS)
        if args.model is None and args.image is None:
            from vlmzip.default_model import sample_inputs

            sample = sample_inputs()[0]
            image, question = sample["image"], question or sample["question"]
    if args.image is not None:
        from vlmzip.loading import load_image

        image = load_image(args.image, processor)
    if image is None:
        image = synthetic_image(image_size)
    model = model.to(args.device)
    return model, processor, name, budgets, image, question or DEFAULT_QUESTION


def _spread(row: dict[str, Any], metric: str) -> str:
    median = row[metric]
    if not median:
        return "-"
    half_range = (row[f"{metric}_max"] - row[f"{metric}_min"]) / 2 / median * 100
    return f"{median:.1f} ±{half_range:.0f}%"


def _times(value: float | None) -> str:
    return f"{value:.2f}x" if value is not None else "-"


def render_table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    columns = ["method", "tokens", "LLM seq", "tower ms", "select ms", "prefill ms", "prefill x wall/CPU (ideal)"]
    columns += ["TTFT ms", "TTFT x wall/CPU", "decode tok/s", "e2e ms", "peak MB (+run)", "KV MB", "GFLOPs tower/LLM"]
    later = any(row.get("ttft_later_ms") is not None for row in rows)
    if later:
        columns += ["later TTFT ms", "later prefill ms", "later TTFT / prefill"]
    for column in columns:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        extra = []
        if later:
            has_later = row.get("ttft_later_ms") is not None
            extra = [
                f"{row['ttft_later_ms']:.1f}" if has_later else "-",
                f"{row['llm_prefill_later_ms']:.1f}" if has_later else "-",
                _times(row.get("ttft_later_over_prefill")),
            ]
        table.add_row(
            row_label(row),
            tokens_cell(row),
            f"{row['llm_tokens']:.0f}",
            f"{row['tower_ms']:.1f}",
            f"{row['select_ms']:.2f}",
            _spread(row, "llm_prefill_ms"),
            f"{_times(row['speedup_llm_prefill'])} / {_times(row['speedup_llm_prefill_cpu'])} "
            f"({_times(row['ideal_speedup_llm_prefill'])})",
            _spread(row, "ttft_ms"),
            f"{_times(row['speedup_ttft'])} / {_times(row['speedup_ttft_cpu'])}",
            f"{row['decode_tok_s']:.1f}",
            f"{row['e2e_ms']:.0f}",
            f"{row['peak_mem_mb']:.0f} (+{row['peak_mem_delta_mb']:.0f})",
            f"{row['kv_cache_mb']:.1f}" if row["kv_cache_mb"] is not None else "-",
            f"{row['tower_gflops']:.1f} / {row['llm_prefill_gflops']:.1f}",
            *extra,
        )
    return table


def _wall_cpu(row: dict[str, Any], key: str, unit: str = "x") -> str:
    """A row's wall-clock and process-CPU-time value of one ratio, as 'wall / CPU'."""
    values = [row[key], row[f"{key}_cpu"]]
    return " / ".join(f"{value:.2f}{unit}" if value is not None else "-" for value in values)


def limit_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Footer under the table: each reduced row's tower against the full-token tower, and its time-to-first-token
    speedup against the limit its own tower and prefill imply (wall-clock / process CPU time)."""
    lines = [
        "tower = the row's tower time / all tokens'; limit = TTFT(all tokens) / (the row's tower + prefill), "
        "the TTFT speedup if nothing else took time; of limit = TTFT speedup / limit (wall / CPU)"
    ]
    for row in rows[1:]:
        lines.append(
            f"{row_label(row)} {tokens_cell(row)}: tower {_wall_cpu(row, 'tower_ratio')}  "
            f"TTFT {_wall_cpu(row, 'speedup_ttft')}  limit {_wall_cpu(row, 'ttft_limit')}  "
            f"of limit {_wall_cpu(row, 'ttft_of_limit', '')}"
        )
    return lines


def plot_bench(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    from vlmzip.bench.report import plot_lines

    series: dict[str, list[tuple[float, float]]] = {}
    full = rows[0]
    keys = ("speedup_llm_prefill", "speedup_ttft", "peak_mem_delta_mb")
    for row in rows[1:]:
        for key in keys:
            if row[key] is not None:
                name = row["method"] + (" (adaptive)" if row.get("attention_mass") is not None else "")
                name += f" {row['quantize']}" if row.get("quantize", "none") != "none" else ""
                points = series.setdefault(f"{name}|{key}", [(full["tokens"], full[key])])  # lines end at all tokens
                points.append((row["tokens"], row[key]))
    for points in series.values():
        points.sort()
    panels = [
        ("speedup_llm_prefill", "LLM prefill speedup vs all tokens (x)"),
        ("speedup_ttft", "time-to-first-token speedup (x)"),
        ("peak_mem_delta_mb", "peak memory above weights (MB)"),
    ]
    reference = {"speedup_llm_prefill": 1.0, "speedup_ttft": 1.0, "peak_mem_delta_mb": full["peak_mem_delta_mb"]}
    return plot_lines(series, panels, path, title=title, reference=reference)


def quantize_schemes(values: str | list[str]) -> list[str]:
    """The `--quantize` schemes in the order they run: the model's own dtype ("none") before int8."""
    schemes = list(dict.fromkeys([values] if isinstance(values, str) else values))
    if schemes and schemes[0] != "none" and "none" in schemes:
        raise ValueError("--quantize: give 'none' before 'int8' (quantizing is done in place and cannot be undone)")
    return schemes or ["none"]


def run_bench(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vlmzip.bench.report import check_output_path, table_console, write_json
    from vlmzip.bench.runner import PipelineBench, with_ratios
    from vlmzip.config import check_int
    from vlmzip.prompts import build_prompt

    if args.model is not None and args.arch is not None:
        raise ValueError("give either --model or --arch, not both")
    if args.shared_layer_weights and args.arch is None:
        raise ValueError("--shared-layer-weights needs --arch")
    from vlmzip.outputs import model_inputs

    inputs = [*(model_inputs(args.model) if args.arch is None else []), ("--image", args.image)]
    json_path = check_output_path(args.json, ".json", "--json", inputs)
    plot_path = check_output_path(args.plot, ".png", "--plot", inputs)
    batch = check_int("--batch", args.batch, 1)
    repeats = check_int("--repeats", args.repeats if args.repeats is not None else (1 if args.arch else 3), 1)
    warmup = check_int("--warmup", args.warmup, 0)
    new_tokens = check_int("--new-tokens", args.new_tokens if args.new_tokens else (4 if args.arch else 16), 2)
    questions_per_image = check_int("--questions-per-image", args.questions_per_image, 1)
    schemes = quantize_schemes(args.quantize)
    if schemes != ["none"] and args.device != "cpu":
        raise ValueError(f"--quantize {' '.join(schemes)} runs on CPU only; leave --device at cpu")
    check_device(args.device)
    variants_from_args(args, DEFAULT_BUDGETS)  # bad names and budgets fail before loading
    if args.threads:
        torch.set_num_threads(check_int("--threads", args.threads, 1))

    console = Console(stderr=True, soft_wrap=True)  # status lines hold paths: never break them
    with console.status("loading model"):
        model, processor, name, budgets, image, question = load_subject(args)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        variants = variants_from_args(args, budgets, model, console)
        tokenizer = getattr(processor, "tokenizer", processor)
        tokenizer.padding_side = "left"
        batches = []
        for text in questions_for(question, questions_per_image):
            prompt = build_prompt(processor, text)
            # One list per sample: processors of tiled models (SmolVLM) need the nesting with a batch of prompts.
            images = [[image] for _ in range(batch)]
            encoded = processor(images=images, text=[prompt] * batch, return_tensors="pt", padding=True)
            batches.append(encoded.to(args.device))
        pad_token_id = getattr(tokenizer, "pad_token_id", None)

    total = len(schemes) * len(variants) * (warmup + repeats)
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    rows: list[dict[str, Any]] = []
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("measuring", total=total)
        for scheme in schemes:  # "none" first: quantizing is done in place and cannot be undone
            if scheme != "none":
                from vlmzip.bench.quantize import quantize_language_model

                progress.update(task, description=f"quantizing the language model ({scheme})")
                quantize_language_model(model, scheme)
            bench = PipelineBench(
                model, batches[0], variants, new_tokens=new_tokens, pad_token_id=pad_token_id, followups=batches[1:]
            )

            def advance(variant: Any, scheme: str = scheme) -> None:
                progress.update(task, advance=1, description=f"measuring (last: {variant.label}, {scheme})")

            for result in bench.run(repeats=repeats, warmup=warmup, progress=advance):
                rows.append({**result.summary(), "quantize": scheme})
    rows = with_ratios(rows)  # every ratio is to the first row: all tokens, unquantized when "none" was given
    settings = {
        "model": name,
        "device": str(bench.device),
        "dtype": dtype,
        "batch": batch,
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "questions_per_image": questions_per_image,
        "shared_layer_weights": bool(args.shared_layer_weights),
    }
    for row in rows:
        row.update(settings)
    quantized = "" if schemes == ["none"] else f", language model {' then '.join(schemes)}"
    title = (
        f"{name} on {settings['device']} ({settings['dtype']}{quantized}, {settings['threads']} threads), "
        f"batch {batch}, "
        f"{new_tokens} new tokens, median of {repeats} (±half range); x = speedup vs all tokens in wall-clock / "
        "process CPU time"
    )
    output = table_console(width=200)
    output.print(render_table(rows, title))
    for line in limit_lines(rows):
        output.print(line, markup=False, highlight=False)
    if json_path is not None:
        write_json(json_path, rows)
        console.print(f"results: {json_path}")
    if plot_path is not None:
        plot_bench(rows, plot_path, title=f"{name}: speed and memory vs visual tokens")
        console.print(f"plot: {plot_path}")
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Measure speed, memory and FLOPs of every reduction method at every budget against all tokens."
    parser = subcommands.add_parser(
        "bench",
        help=help_text,
        description=help_text
        + " Runs are interleaved and repeated; every row carries its ratio to the full-token baseline.",
    )
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="local model directory (default: the embedded default model)")
    source.add_argument("--arch", help="real-size architecture with random weights, e.g. llava-1.5-7b")
    add_variant_options(
        parser,
        methods_help="methods to measure (default: all that the model supports)",
        tokens_help="visual tokens per image (per crop for AnyRes models) to measure (default: 192 128 64; the "
        "--arch entry's); all tokens too",
    )
    parser.add_argument(
        "--shared-layer-weights",
        action="store_true",
        help="with --arch: identical layers share one set of random weights (same compute, ~3 GB for a 7B model)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images (prompts) per batch (default 1)")
    parser.add_argument("--repeats", type=int, help="measured rounds (default 3; 1 with --arch)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    parser.add_argument("--new-tokens", type=int, help="answer length for decode and end-to-end (default 16; 4 --arch)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default float32; bfloat16 with --arch)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--image", help="image file (default: a bundled sample, or a synthetic picture)")
    parser.add_argument("--question", help=f"question (default: the sample's, or {DEFAULT_QUESTION!r})")
    parser.add_argument(
        "--questions-per-image",
        type=int,
        default=1,
        help="N different questions per image (default 1): reduced variants answer the later ones from an image "
        "cache filled by the first; the table adds their TTFT and prefill",
    )
    parser.add_argument(
        "--quantize",
        nargs="+",
        choices=["none", "int8"],
        default=["none"],
        help="int8: the language model's linear layers get int8 weights (PyTorch dynamic quantization, CPU); "
        "'none int8' measures every variant in the model's dtype, then quantizes and measures again, in one run",
    )
    parser.add_argument("--json", help="write one object per method x budget to this .json file")
    parser.add_argument("--plot", help="draw speedups and memory vs tokens to this .png file")
    parser.set_defaults(run=run_bench)
