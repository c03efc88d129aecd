"""Vision-tower cost of VisionZip, measured side by side in one run.

Three ways to get what the projector needs, timed interleaved on the same inputs:
  plain      the tower as LLaVA runs it (sdpa, all layers, hidden states kept)
  visionzip  compress_vision: hooks at the feature layer, stops after it, reduces
  eager      the reference route: eager attention with output_attentions=True, then reduce

Qwen towers (`--tower qwen2.5-vl-7b`, ... : the tower of that `vlmzip bench --arch` entry, random
weights, on the entry's benchmark image) compare two routes: plain (the tower and its merger, as the
model runs them) and visionzip (`probe_qwen_tower`, which runs the same tower in full and scores the
merge units from the scoring block's captured queries and keys, then the reduction). Every route is
timed in wall-clock and in process CPU time (all threads), the latter less sensitive to other jobs.

    vlmzip bench-tower                                   # tiny CLIP tower of the test suite
    vlmzip bench-tower --tower clip-l-336 --batch 1 --repeats 3
    vlmzip bench-tower --tower qwen2.5-vl-7b --batch 1 --repeats 3 --dominant 126 --contextual 18
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from vlmzip.api import compress_vision
from vlmzip.core import visionzip_reduce

if TYPE_CHECKING:
    from transformers import CLIPVisionModel

TOWERS: dict[str, dict[str, int]] = {
    # The tiny tower of the test suite: LLaVA-1.5 geometry (336 px, patch 14), small widths.
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 4, "num_attention_heads": 4},
    # CLIP ViT-L/14-336, LLaVA-1.5's tower (random weights: speed does not depend on their values).
    "clip-l-336": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
}


# The vision towers of these `vlmzip bench --arch` entries (see `vlmzip.bench.arch`).
QWEN_TOWERS = ("qwen2-vl-2b", "qwen2.5-vl-7b", "qwen3-vl-8b")


def build_tower(name: str, dtype: torch.dtype) -> CLIPVisionModel:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **TOWERS[name])
    torch.manual_seed(0)
    return CLIPVisionModel(config).to(dtype).eval()


def eager_route(tower: CLIPVisionModel, pixel_values: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip computed from full attention maps, as implementations without a probe do it."""
    out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    layer = tower.encoder.layers[-2]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
    batch, tokens, _ = keys.shape
    keys = keys.view(batch, tokens, tower.config.num_attention_heads, -1).mean(dim=2)
    scores = out.attentions[-2][:, :, 0, 1:].sum(dim=1)
    return visionzip_reduce(out.hidden_states[-2], scores, keys, dominant, contextual).features


def time_interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[tuple[float, float]]]:
    """Run every variant `repeats` times, rotating the order each round so drift hits all alike.

    Returns (wall-clock seconds, process CPU seconds) of every run of every variant.
    """
    for _ in range(warmup):
        for run in variants.values():
            run()
    names = list(variants)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            variants[name]()
            times[name].append((time.perf_counter() - start, time.process_time() - cpu_start))
    return times


def qwen_routes(
    name: str, dtype: torch.dtype, batch: int, dominant: int, contextual: int
) -> dict[str, Callable[[], object]]:
    """The plain and visionzip routes of the vision tower of `--arch name`, on `batch` copies of its benchmark image."""
    from vlmzip.adapters.qwen2_vl import probe_qwen_tower
    from vlmzip.bench.arch import ARCHS, build_arch_tower
    from vlmzip.bench.cli import synthetic_image

    tower, processor = build_arch_tower(name, dtype)
    image = synthetic_image(ARCHS[name].image_size)
    processed = processor.image_processor(images=[image] * batch, return_tensors="pt")
    pixel_values, grid_thw = processed["pixel_values"].to(dtype), processed["image_grid_thw"]
    deepstack = bool(getattr(tower.config, "deepstack_visual_indexes", None))

    def plain() -> object:
        return tower(pixel_values, grid_thw=grid_thw).pooler_output

    def visionzip() -> object:
        probes = probe_qwen_tower(tower, pixel_values, grid_thw, deepstack=deepstack)
        return [
            visionzip_reduce(probe.features, probe.scores, probe.keys, dominant, contextual, has_cls=False).features
            for probe in probes
        ]

    return {"plain": plain, "visionzip": visionzip}


def clip_routes(
    name: str, dtype: torch.dtype, batch: int, dominant: int, contextual: int
) -> dict[str, Callable[[], object]]:
    """The plain, visionzip and eager routes of a CLIP tower on `batch` random images."""
    tower = build_tower(name, dtype)
    pixel_values = torch.randn(batch, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(dtype)

    def plain() -> object:
        tower.set_attn_implementation("sdpa")
        return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]

    def visionzip() -> object:
        tower.set_attn_implementation("sdpa")
        return compress_vision(tower, pixel_values, dominant, contextual).features

    def eager() -> object:
        tower.set_attn_implementation("eager")
        try:
            return eager_route(tower, pixel_values, dominant, contextual)
        finally:
            tower.set_attn_implementation("sdpa")

    return {"plain": plain, "visionzip": visionzip, "eager": eager}


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Time the vision tower alone: plain vs compress_vision (vs eager attention maps), interleaved."
    parser = subcommands.add_parser(
        "bench-tower", help=help_text, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tower", choices=[*sorted(TOWERS), *QWEN_TOWERS], default="tiny", help="default: %(default)s")
    parser.add_argument("--batch", type=int, default=4, help="images per pass (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, help="measured rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default: %(default)s)")
    parser.add_argument("--dominant", type=int, default=54, help="default: %(default)s")
    parser.add_argument("--contextual", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.set_defaults(run=functools.partial(run_tower_bench, parser=parser))


def run_tower_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Time the routes as `args` asks and print the table."""
    from vlmzip.config import VisionZipConfig

    if args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--batch and --repeats must be >= 1, --warmup >= 0")
    VisionZipConfig(dominant=args.dominant, contextual=args.contextual)  # bad budgets fail before the tower is built
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    build = qwen_routes if args.tower in QWEN_TOWERS else clip_routes
    routes = build(args.tower, dtype, args.batch, args.dominant, args.contextual)
    with torch.inference_mode():
        times = time_interleaved(routes, args.repeats, args.warmup)
    wall = {name: statistics.median(run[0] for run in values) for name, values in times.items()}
    cpu = {name: statistics.median(run[1] for run in values) for name, values in times.items()}
    print(
        f"tower={args.tower} batch={args.batch} dtype={args.dtype} repeats={args.repeats} "
        f"threads={torch.get_num_threads()} budget={args.dominant}+{args.contextual}"
    )
    print(
        f"{'route':<10} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'vs plain':>9} "
        f"{'CPU ms':>10} {'CPU vs plain':>13}"
    )
    for name, values in times.items():
        walls = [run[0] for run in values]
        print(
            f"{name:<10} {wall[name] * 1e3:>10.1f} {min(walls) * 1e3:>8.1f} {max(walls) * 1e3:>8.1f} "
            f"{wall[name] / wall['plain']:>8.2f}x {cpu[name] * 1e3:>10.1f} {cpu[name] / cpu['plain']:>12.2f}x"
        )
    summary = f"visionzip / plain = {wall['visionzip'] / wall['plain']:.2f} (CPU {cpu['visionzip'] / cpu['plain']:.2f})"
    if "eager" in wall:
        summary += f"   eager / visionzip = {wall['eager'] / wall['visionzip']:.2f}"
    print(summary)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlmzip.bench.tower ARGS`, the same as `vlmzip bench-tower ARGS`."""
    from vlmzip.cli import main as cli_main

    return cli_main(["bench-tower", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
