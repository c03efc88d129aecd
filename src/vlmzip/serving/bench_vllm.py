"""`vllm serve` with and without the VisionZip plugin, side by side in one run: requests/s and time to first token.

    vlmzip bench-vllm [--family llava-1.5|qwen2.5-vl|qwen3-vl|default] [--model DIR] [--requests 16]
                      [--max-tokens 16] [--dominant 54 --contextual 10]

The same weights are exported twice: `vlmzip export --plain` (vLLM's own architecture, every visual
token) and `vlmzip export` (the plugin, `dominant + contextual` tokens per image or per Qwen image).
Each is served in turn by a fresh `vllm serve` with the same options (`--max-model-len`, dtype,
`--max-num-seqs`, `VLLM_CPU_KVCACHE_SPACE`, eager mode) and gets the same requests through the OpenAI
chat API:
- warm-up: two requests with their own images, not timed;
- timed: `--requests` requests, one thread each, released together, each with its own distinct
  image (no cache hits) and streamed. Every request generates exactly `--max-tokens` tokens
  (`ignore_eos` and `min_tokens`), so both sides decode the same amount; a run where a completion
  has another length is an error. The batch time runs from the first request sent to the last
  token received; time to first token is from a request's send to its first streamed chunk.
Prompt tokens per request (vLLM's `usage.prompt_tokens`) are printed for both sides, so the speed-up
can be set against the token reduction.

Without --model, `--family` picks the model: random LLaVA-1.5 (CLIP 336/14, the default), random
Qwen2.5-VL, random Qwen3-VL with deepstack, or the embedded default model (`default`: LLaVA with a
DINOv2 tower; vLLM has no DINOv2 tower of its own, so its baseline is the plugin keeping all 577
tokens). Images are 336 x 336. The random models' language models are tiny next to a real 7B one, so
the gains measured on them understate what a real model shows: say so when quoting them.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from vlmzip.config import VisionZipConfig, check_int
from vlmzip.outputs import refuse_overlap, write_json

VARIANTS = ("vllm", "vllm+visionzip")
PROMPT = "USER: <image> what is in the image ? ASSISTANT:"
# The default model: a language model a few times the tower's size, as in LLaVA (7B LM, 0.3B tower).
BENCH_MODEL = {"text_hidden": 512, "text_layers": 8, "vision_hidden": 256, "vision_layers": 6}
ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
WARMUP_REQUESTS = 2
IMAGE_SIDE = 336

# family -> the question asked about each image (in the random models' vocabulary).
FAMILY_QUESTIONS = {
    "llava-1.5": "what is in the image ?",
    "qwen2.5-vl": "what is in the image ?",
    "qwen3-vl": "what is in the image ?",
    "default": "what shape is the rightmost object?",
}


def family_model(family: str, work: Path) -> Path:
    """The model directory `--family` benchmarks when no --model is given."""
    if family == "qwen2.5-vl":
        from vlmzip.serving.tiny import build_tiny_qwen2_5_vl

        return build_tiny_qwen2_5_vl(work / "tiny", max_pixels=448 * 448)
    if family == "qwen3-vl":
        from vlmzip.serving.tiny import build_tiny_qwen3_vl

        return build_tiny_qwen3_vl(work / "tiny", max_pixels=448 * 448)
    if family == "default":
        from vlmzip.default_model import default_model_dir

        return default_model_dir()
    from vlmzip.serving.tiny import build_tiny_llava

    return build_tiny_llava(work / "tiny", **BENCH_MODEL)


def make_image_urls(count: int, seed: int) -> list[str]:
    """`count` distinct random 336 x 336 PNG images as data URLs."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    urls = []
    for _ in range(count):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (IMAGE_SIDE, IMAGE_SIDE, 3), dtype=np.uint8)).save(buffer, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode())
    return urls


# --- one server ----------------------------------------------------------------------------------
def _wait_until_healthy(process: subprocess.Popen, port: int, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm serve exited with {process.returncode}; see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise RuntimeError(f"vllm serve not healthy after {timeout:.0f} s; see {log}")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stream_one(client: Any, model: str, url: str, spec: dict[str, Any]) -> dict[str, Any]:
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": spec["question"]}],
        }
    ]
    sent = time.perf_counter()
    first = None
    usage = None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        temperature=0,
        max_tokens=spec["max_tokens"],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "min_tokens": spec["max_tokens"]},
    )
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter()
        if chunk.usage is not None:
            usage = chunk.usage
    done = time.perf_counter()
    if usage is None or first is None:
        raise RuntimeError("the server's stream had no tokens or no usage")
    return {
        "sent": sent,
        "first": first,
        "done": done,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
    }


def _concurrent(client: Any, model: str, urls: list[str], spec: dict[str, Any]) -> list[dict[str, Any]]:
    """One thread per request, all released together; results in request order."""
    results: list[Any] = [None] * len(urls)
    barrier = threading.Barrier(len(urls))

    def work(index: int) -> None:
        barrier.wait()
        try:
            results[index] = _stream_one(client, model, urls[index], spec)
        except Exception as error:  # noqa: BLE001 - reported below with the request's index
            results[index] = error

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = [f"request {i}: {r}" for i, r in enumerate(results) if isinstance(r, Exception)]
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return results


def run_variant(model_dir: Path, spec: dict[str, Any], log: Path, urls: list[str]) -> dict[str, Any]:
    """Serve `model_dir`, warm it up, time the concurrent batch, stop the server."""
    from openai import OpenAI

    port = _free_port()
    vllm = str(Path(sys.executable).with_name("vllm"))
    command = [vllm, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--enforce-eager"]
    command += ["--dtype", spec["dtype"], "--max-model-len", str(spec["max_model_len"])]
    command += ["--max-num-seqs", str(spec["requests"])]
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_KVCACHE_SPACE": str(spec["kv_cache_gib"])}
    started = time.perf_counter()
    with log.open("w") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        _wait_until_healthy(process, port, log, timeout=900)
        startup_s = time.perf_counter() - started
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=1800, max_retries=0)
        _concurrent(client, str(model_dir), urls[:WARMUP_REQUESTS], spec)  # warm-up, not timed
        load_before = os.getloadavg()[0]
        timed = _concurrent(client, str(model_dir), urls[WARMUP_REQUESTS:], spec)
        load_after = os.getloadavg()[0]
    finally:
        process.send_signal(signal.SIGINT)  # vllm serve shuts its engine down on Ctrl-C
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=60)
    lengths = {r["completion_tokens"] for r in timed}
    if lengths != {spec["max_tokens"]}:
        raise RuntimeError(f"completions of {sorted(lengths)} tokens, expected {spec['max_tokens']} each")
    batch_s = max(r["done"] for r in timed) - min(r["sent"] for r in timed)
    ttft = [r["first"] - r["sent"] for r in timed]
    prompt_tokens = [r["prompt_tokens"] for r in timed]
    return {
        "startup_s": startup_s,
        "requests": len(timed),
        "prompt_tokens_per_request": statistics.fmean(prompt_tokens),
        "prompt_tokens_min_max": [min(prompt_tokens), max(prompt_tokens)],
        "completion_tokens_per_request": spec["max_tokens"],
        "batch_s": batch_s,
        "requests_per_s": len(timed) / batch_s,
        "output_tokens_per_s": len(timed) * spec["max_tokens"] / batch_s,
        "ttft_mean_s": statistics.fmean(ttft),
        "ttft_median_s": statistics.median(ttft),
        "load_average": [load_before, load_after],
    }


# How each row compares the plugin with plain vLLM: "faster" (a throughput: plugin / plain; a time:
# plain / plugin) or "fewer" (a count: plain / plugin).
_ROWS = (
    ("prompt tokens / request", "prompt_tokens_per_request", "{:.0f}", "fewer"),
    ("generated tokens / request", "completion_tokens_per_request", "{:.0f}", "same"),
    ("requests / s", "requests_per_s", "{:.3f}", "faster"),
    ("output tokens / s", "output_tokens_per_s", "{:.1f}", "faster"),
    ("TTFT mean (s)", "ttft_mean_s", "{:.3f}", "faster, time"),
    ("TTFT median (s)", "ttft_median_s", "{:.3f}", "faster, time"),
    ("batch time (s)", "batch_s", "{:.2f}", "faster, time"),
    ("server start-up (s)", "startup_s", "{:.1f}", "faster, time"),
)


def format_table(results: dict[str, dict[str, Any]], config: VisionZipConfig) -> str:
    base, zipped = results[VARIANTS[0]], results[VARIANTS[1]]
    lines = [f"{'':28} {VARIANTS[0]:>12} {VARIANTS[1]:>16}  plugin vs plain"]
    for label, key, fmt, kind in _ROWS:
        if kind == "same":
            comparison = "same on both"
        else:
            ratio = zipped[key] / base[key] if kind == "faster" else base[key] / zipped[key]
            comparison = f"{ratio:.2f}x {kind.split(',')[0]}"
        lines.append(f"{label:28} {fmt.format(base[key]):>12} {fmt.format(zipped[key]):>16}  {comparison}")
    loads = ", ".join(f"{a:.1f}-{b:.1f}" for a, b in (base["load_average"], zipped["load_average"]))
    lines.append(
        f"{base['requests']} concurrent requests with distinct images through `vllm serve`; VisionZip "
        f"{config.dominant} + {config.contextual} = {config.tokens} tokens per image. 'faster': throughput "
        f"plugin / plain, time plain / plugin; 'fewer': plain / plugin. 1-minute load average before-after "
        f"each timed batch: {loads} (wall times need a quiet machine)"
    )
    return "\n".join(lines)


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    from vlmzip.export import export_model

    config = VisionZipConfig(dominant=args.dominant, contextual=args.contextual)
    requests = check_int("--requests", args.requests, 1)
    max_tokens = check_int("--max-tokens", args.max_tokens, 1)
    max_model_len = check_int("--max-model-len", args.max_model_len, 64)
    kv_cache_gib = check_int("--kv-cache-gib", args.kv_cache_gib, 1)
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
        positions = (
            json.loads((source / "config.json").read_text()).get("text_config", {}).get("max_position_embeddings")
        )
        spec = {
            "requests": requests,
            "max_tokens": max_tokens,
            "dtype": args.dtype,
            "max_model_len": min(max_model_len, int(positions or max_model_len)),
            "kv_cache_gib": kv_cache_gib,
            "question": FAMILY_QUESTIONS[args.family],
        }
        urls = make_image_urls(WARMUP_REQUESTS + requests, seed=0)
        logs = Path(args.logs) if args.logs else work
        logs.mkdir(parents=True, exist_ok=True)
        results = {variant: run_variant(work / variant, spec, logs / f"{variant}.log", urls) for variant in VARIANTS}
    report = {
        "family": args.family,
        "model": args.model or ({"tiny": BENCH_MODEL} if args.family == "llava-1.5" else args.family),
        "visionzip": config.to_dict(),
        **{key: value for key, value in spec.items() if key != "question"},
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
        choices=sorted(FAMILY_QUESTIONS),
        default="llava-1.5",
        help="model family: sets the question, and the model when --model is not given (default llava-1.5)",
    )
    parser.add_argument("--model", help="transformers model directory of --family (default: the family's own)")
    parser.add_argument("--requests", type=int, default=16, help="concurrent image requests timed (default 16)")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request (default 16)")
    parser.add_argument("--max-model-len", type=int, default=2048, help="vllm serve --max-model-len, both sides")
    parser.add_argument("--kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE, both sides (default 2)")
    parser.add_argument("--dominant", type=int, default=54)
    parser.add_argument("--contextual", type=int, default=10)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "auto"))
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument("--logs", help="keep the servers' logs in this directory")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from vlmzip.cli import UserError

    try:
        benchmark(args)
    except RuntimeError as error:  # an engine that failed: its log says why
        raise UserError(str(error)) from None
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m vlmzip.serving.bench_vllm ARGS`, the same as `vlmzip bench-vllm ARGS`."""
    from vlmzip.cli import main as cli_main

    return cli_main(["bench-vllm", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
