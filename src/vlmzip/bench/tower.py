"""Vision-tower cost of VisionZip, measured side by side in one run.

Three ways to get what the projector needs, timed interleaved on the same inputs:
  plain      the tower as LLaVA runs it (sdpa, all layers, hidden states kept)
  visionzip  compress_vision: hooks at the feature layer, stops after it, reduces
  eager      the reference route: eager attention with output_attentions=True, then reduce

    vlmzip bench-tower                                   # tiny CLIP tower of the test suite
    vlmzip bench-tower --tower clip-l-336 --batch 1 --repeats 3
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


def build_tower(name: str, dtype: torch.dtype) -> CLIPVisionModel:
    from transformers import CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(image_size=336, patch_size=14, projection_dim=768, **TOWERS[name])
    torch.manual_seed(0)
    return CLIPVisionModel(config).to(dtype).eval()


def eager_route(tower: CLIPVisionModel, pixel_values: torch.Tensor, dominant: int, contextual: int) -> torch.Tensor:
    """VisionZip computed from full attention maps, as implementations without a probe do it."""
    from vlmzip.core import visionzip_reduce

    out = tower(pixel_values=pixel_values, output_attentions=True, output_hidden_states=True)
    layer = tower.encoder.layers[-2]
    keys = layer.self_attn.k_proj(layer.layer_norm1(out.hidden_states[-3]))
    batch, tokens, _ = keys.shape
    keys = keys.view(batch, tokens, tower.config.num_attention_heads, -1).mean(dim=2)
    scores = out.attentions[-2][:, :, 0, 1:].sum(dim=1)
    return visionzip_reduce(out.hidden_states[-2], scores, keys, dominant, contextual).features


def time_interleaved(
    variants: dict[str, Callable[[], object]], repeats: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every variant `repeats` times, rotating the order each round so drift hits all alike."""
    for _ in range(warmup):
        for run in variants.values():
            run()
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names[round_index % len(names) :] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - start)
    return times


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Time the vision tower alone: plain sdpa vs compress_vision vs eager attention maps, interleaved."
    parser = subcommands.add_parser(
        "bench-tower",
        help=help_text,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--tower", choices=sorted(TOWERS), default="tiny", help="default: %(default)s")
    parser.add_argument("--batch", type=int, default=4, help="images per pass (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=10, help="measured rounds (default: %(default)s)")
    parser.add_argument("--dominant", type=int, default=54, help="default: %(default)s")
    parser.add_argument("--contextual", type=int, default=10, help="default: %(default)s")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="default: %(default)s")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.set_defaults(run=functools.partial(run_tower_bench, parser=parser))


def run_tower_bench(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Time the three routes as `args` asks and print the table."""
    from vlmzip.api import compress_vision
    from vlmzip.config import VisionZipConfig

    if args.batch < 1 or args.repeats < 1:
        parser.error("--batch and --repeats must be >= 1")
    VisionZipConfig(dominant=args.dominant, contextual=args.contextual)  # bad budgets fail before the tower is built
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tower = build_tower(args.tower, dtype)
    pixel_values = torch.randn(args.batch, 3, 336, 336, generator=torch.Generator().manual_seed(0)).to(dtype)

    def plain() -> object:
        tower.set_attn_implementation("sdpa")
        return tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-2]

    def visionzip() -> object:
        tower.set_attn_implementation("sdpa")
        return compress_vision(tower, pixel_values, args.dominant, args.contextual).features

    def eager() -> object:
        tower.set_attn_implementation("eager")
        try:
            return eager_route(tower, pixel_values, args.dominant, args.contextual)
        finally:
            tower.set_attn_implementation("sdpa")

    with torch.inference_mode():
        times = time_interleaved({"plain": plain, "visionzip": visionzip, "eager": eager}, args.repeats)
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(
        f"tower={args.tower} batch={args.batch} dtype={args.dtype} repeats={args.repeats} "
        f"threads={torch.get_num_threads()} budget={args.dominant}+{args.contextual}"
    )
    print(f"{'route':<10} {'median ms':>10} {'min ms':>8} {'max ms':>8} {'vs plain':>9}")
    for name, values in times.items():
        print(
            f"{name:<10} {medians[name] * 1e3:>10.1f} {min(values) * 1e3:>8.1f} {max(values) * 1e3:>8.1f} "
            f"{medians[name] / medians['plain']:>8.2f}x"
        )
    print(
        f"visionzip / plain = {medians['visionzip'] / medians['plain']:.2f}   "
        f"eager / visionzip = {medians['eager'] / medians['visionzip']:.2f}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m vlmzip.bench.tower ARGS`, the same as `vlmzip bench-tower ARGS`."""
    from vlmzip.cli import main as cli_main

    return cli_main(["bench-tower", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
