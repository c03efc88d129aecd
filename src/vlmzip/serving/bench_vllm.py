"""vLLM with and without the VisionZip plugin, side by side in one run: throughput and time to first token.

    vlmzip bench-vllm [--family llava-1.5|qwen2.5-vl|default] [--model DIR] [--requests 16]
                      [--dominant 54 --contextual 10]

The same LLaVA-1.5 weights are exported twice (`vlmzip export` and `vlmzip export --plain`):
vLLM's own LLaVA with every visual token (576 per image) and the plugin with `dominant + contextual`.
Each variant runs in a fresh process (offline engine, in-process core), in turn, on the same distinct
images (no multimodal cache hits):
- batch: all requests submitted at once: requests/s, prompt tokens/s, output tokens/s, mean TTFT,
  and requests per CPU-second (the engine runs in the worker process, so its CPU time is its compute);
- single: requests one at a time, one token each: median TTFT (latency without queueing) and its CPU time.
Without --model, `--family` picks the model: a random LLaVA-1.5-shaped model (CLIP 336/14 tower,
the default), a random tiny Qwen2.5-VL (336 x 336 images: 144 merged tokens each), or the embedded
default model (`default`: LLaVA with a DINOv2 tower, 577 tokens per image; vLLM has no DINOv2 tower
of its own, so its baseline is the plugin keeping all 577 tokens). The random models'
language models are tiny next to a real 7B one, so the gains measured on them understate what a
real model shows: say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vlmzip.config import VisionZipConfig, check_int
from vlmzip.outputs import refuse_overlap, write_json

VARIANTS = ("vllm", "vllm+visionzip")
PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
# The default model: a language model a few times the tower's size, as in LLaVA (7B LM, 0.3B tower).
BENCH_MODEL = {"text_hidden": 512, "text_layers": 8, "vision_hidden": 256, "vision_layers": 6}
ENGINE_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"}


# family -> the prompt of one image request.
FAMILY_PROMPTS = {
    "llava-1.5": PROMPT,
    "qwen2.5-vl": "USER: <|vision_start|> <|image_pad|> <|vision_end|> what is in the image ? ASSISTANT:",
    "default": "<image>\nQuestion: what shape is the rightmost object? Answer:",
}


def family_model(family: str, work: Path) -> Path:
    """The model directory `--family` benchmarks when no --model is given."""
    if family == "qwen2.5-vl":
        from vlmzip.serving.tiny import build_tiny_qwen2_5_vl

        return build_tiny_qwen2_5_vl(work / "tiny", max_pixels=448 * 448)
    if family == "default":
        from vlmzip.default_model import default_model_dir

        return default_model_dir()
    from vlmzip.serving.tiny import build_tiny_llava

    return build_tiny_llava(work / "tiny", **BENCH_MODEL)


def make_images(count: int, seed: int) -> list[Any]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)) for _ in range(count)]


def run_worker(model_dir: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Inside a fresh process: start one engine, warm it up, time the batch and the single requests."""
    from vllm import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(
        model=model_dir,
        enforce_eager=True,
        max_model_len=spec.get("max_model_len", 2048),
        dtype=spec["dtype"],
        seed=0,
        disable_log_stats=False,  # per-request first-token latency
    )
    startup_s = time.perf_counter() - started
    params = SamplingParams(temperature=0, max_tokens=spec["max_tokens"], ignore_eos=True)
    images = make_images(spec["requests"] + spec["single"] + 2, seed=spec["seed"])

    def requests(batch: list[Any]) -> list[dict[str, Any]]:
        return [{"prompt": spec.get("prompt", PROMPT), "multi_modal_data": {"image": image}} for image in batch]

    llm.generate(requests(images[-2:]), params, use_tqdm=False)  # warm-up, not timed
    batch_images = images[: spec["requests"]]
    # The engine runs in this process: process CPU time is its compute, whatever else the machine runs.
    started, cpu_started = time.perf_counter(), time.process_time()
    outputs = llm.generate(requests(batch_images), params, use_tqdm=False)
    batch_s, batch_cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    output_tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    batch_ttft = [o.metrics.first_token_latency for o in outputs if o.metrics is not None]

    # One request at a time, one token each: the time to first token without queueing.
    first_token = SamplingParams(temperature=0, max_tokens=1)
    single_s, single_cpu_s = [], []
    for image in images[spec["requests"] : spec["requests"] + spec["single"]]:
        started, cpu_started = time.perf_counter(), time.process_time()
        llm.generate(requests([image]), first_token, use_tqdm=False)
        single_s.append(time.perf_counter() - started)
        single_cpu_s.append(time.process_time() - cpu_started)
    return {
        "startup_s": startup_s,
        "requests": len(outputs),
        "prompt_tokens_per_request": prompt_tokens / len(outputs),
        "batch_s": batch_s,
        "batch_cpu_s": batch_cpu_s,
        "requests_per_s": len(outputs) / batch_s,
        "requests_per_cpu_s": len(outputs) / batch_cpu_s,
        "prompt_tokens_per_s": prompt_tokens / batch_s,
        "output_tokens_per_s": output_tokens / batch_s,
        "batch_ttft_mean_s": statistics.fmean(batch_ttft) if batch_ttft else float("nan"),
        "single_ttft_median_s": statistics.median(single_s) if single_s else float("nan"),
        "single_ttft_cpu_median_s": statistics.median(single_cpu_s) if single_cpu_s else float("nan"),
        "load_average": os.getloadavg()[0],
    }


def run_variant(model_dir: Path, spec: dict[str, Any], log: Path) -> dict[str, Any]:
    result_path = log.with_suffix(".json")
    command = [sys.executable, "-m", "vlmzip.serving.bench_vllm", "--worker", str(model_dir), json.dumps(spec)]
    with log.open("w") as log_file:
        completed = subprocess.run(
            [*command, str(result_path)], env={**os.environ, **ENGINE_ENV}, stdout=log_file, stderr=subprocess.STDOUT
        )
    if completed.returncode != 0:
        raise RuntimeError(f"the {model_dir.name} engine failed (exit {completed.returncode}); see {log}")
    return json.loads(result_path.read_text())


# How each row compares the plugin with plain vLLM: "faster" (a throughput: plugin / plain; a time:
# plain / plugin), "fewer" (a count: plain / plugin), or "of plain" (plugin / plain, not a speed).
_ROWS = (
    ("prompt tokens / request", "prompt_tokens_per_request", "{:.0f}", "fewer"),
    ("requests / s (batch)", "requests_per_s", "{:.3f}", "faster"),
    ("prompt tokens / s (batch)", "prompt_tokens_per_s", "{:.1f}", "of plain"),
    ("output tokens / s (batch)", "output_tokens_per_s", "{:.1f}", "faster"),
    ("requests / CPU-s (batch)", "requests_per_cpu_s", "{:.3f}", "faster"),
    ("TTFT mean, batch (s)", "batch_ttft_mean_s", "{:.3f}", "faster, time"),
    ("TTFT median, one at a time (s)", "single_ttft_median_s", "{:.3f}", "faster, time"),
    ("  CPU-s of it", "single_ttft_cpu_median_s", "{:.3f}", "faster, time"),
    ("engine start-up (s)", "startup_s", "{:.1f}", "faster, time"),
)


def format_table(results: dict[str, dict[str, Any]], config: VisionZipConfig) -> str:
    base, zipped = results[VARIANTS[0]], results[VARIANTS[1]]
    lines = [f"{'':32} {VARIANTS[0]:>12} {VARIANTS[1]:>16}  plugin vs plain"]
    for label, key, fmt, kind in _ROWS:
        if kind in ("faster", "of plain"):
            ratio = zipped[key] / base[key]
        else:  # a time or a count: smaller is the plugin's gain
            ratio = base[key] / zipped[key]
        comparison = f"{ratio:.2f}x {kind.split(',')[0]}"
        lines.append(f"{label:32} {fmt.format(base[key]):>12} {fmt.format(zipped[key]):>16}  {comparison}")
    lines.append(
        f"VisionZip {config.dominant} + {config.contextual} = {config.tokens} tokens per image. 'faster': the "
        "plugin's speed-up (throughput plugin / plain, time plain / plugin); 'fewer': plain / plugin; prompt "
        "tokens / s is not a speed: each plugin request has fewer prompt tokens, so compare requests / s. "
        f"Load average during the runs: {base['load_average']:.1f}, {zipped['load_average']:.1f} (wall times "
        "need a quiet machine, CPU-s less so)"
    )
    return "\n".join(lines)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from vlmzip.export import export_model

    config = VisionZipConfig(dominant=args.dominant, contextual=args.contextual)
    requests = check_int("--requests", args.requests, 1)
    single = check_int("--single", args.single, 0)
    max_tokens = check_int("--max-tokens", args.max_tokens, 1)
    inputs = [("--model", args.model)]
    if args.output:
        refuse_overlap(args.output, inputs, "--output")
    if args.logs:
        refuse_overlap(args.logs, inputs, "--logs")
    with tempfile.TemporaryDirectory(prefix="vlmzip-bench-vllm-") as scratch:
        work = Path(scratch)
        source = Path(args.model) if args.model else family_model(args.family, work)
        if json.loads((source / "config.json").read_text())["vision_config"].get("model_type") == "dinov2":
            # vLLM's own LLaVA has no DINOv2 tower: the baseline is the plugin keeping all 577 tokens.
            export_model(source, work / VARIANTS[0], VisionZipConfig(dominant=577, contextual=0))
        else:
            export_model(source, work / VARIANTS[0], plugin=False)
        export_model(source, work / VARIANTS[1], config)
        spec = {"requests": requests, "single": single, "max_tokens": max_tokens, "dtype": args.dtype, "seed": 0}
        spec["prompt"] = FAMILY_PROMPTS[args.family]
        positions = (
            json.loads((source / "config.json").read_text()).get("text_config", {}).get("max_position_embeddings")
        )
        spec["max_model_len"] = min(2048, int(positions or 2048))
        logs = Path(args.logs) if args.logs else work
        logs.mkdir(parents=True, exist_ok=True)
        results = {variant: run_variant(work / variant, spec, logs / f"{variant}.log") for variant in VARIANTS}
    report = {
        "family": args.family,
        "model": args.model or ({"tiny": BENCH_MODEL} if args.family == "llava-1.5" else args.family),
        "visionzip": config.to_dict(),
        **spec,
        "results": results,
    }
    print(format_table(results, config))
    if args.output:
        write_json(args.output, report)
    return report


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = __doc__.split("\n")[0]
    parser = subcommands.add_parser(
        "bench-vllm",
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--family",
        choices=sorted(FAMILY_PROMPTS),
        default="llava-1.5",
        help="model family: sets the prompt, and the model when --model is not given (default llava-1.5)",
    )
    parser.add_argument("--model", help="transformers model directory of --family (default: the family's own)")
    parser.add_argument("--requests", type=int, default=16, help="image requests in the timed batch (default 16)")
    parser.add_argument("--single", type=int, default=4, help="requests timed one at a time (default 4)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    parser.add_argument("--dominant", type=int, default=54)
    parser.add_argument("--contextual", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--logs", help="keep the engines' logs in this directory")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from vlmzip.cli import UserError

    try:
        benchmark(args)
    except RuntimeError as error:  # an engine that failed: its log says why
        raise UserError(str(error)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vlmzip.serving.bench_vllm ARGS`, the same as `vlmzip bench-vllm ARGS`.

    `--worker MODEL_DIR SPEC RESULT` runs one engine in this process (the benchmark starts one per variant).
    """
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        _, model_dir, spec, result_path = argv
        Path(result_path).write_text(json.dumps(run_worker(model_dir, json.loads(spec))), encoding="utf-8")
        return 0
    from vlmzip.cli import main as cli_main

    return cli_main(["bench-vllm", *argv])


if __name__ == "__main__":
    sys.exit(main())
