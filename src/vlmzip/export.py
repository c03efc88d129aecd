"""`vlmzip export`: write a model directory that `vllm serve` loads with the VisionZip plugin.

The output holds everything the input has (tokenizer, processor, chat template, generation config),
plus:
- config.json naming the plugin's architecture (`VisionZipLlavaForConditionalGeneration` for
  LLaVA-1.5, `VisionZipQwen2_5_VLForConditionalGeneration` for Qwen2.5-VL,
  `VisionZipQwen3VLForConditionalGeneration` for Qwen3-VL);
- visionzip_config.json with the budget (`VisionZipConfig.to_dict()`; --hf-overrides can change it);
- LLaVA: the weights in the classic LLaVA-1.5 layout that vLLM's loader reads (and transformers still
  loads): `vision_tower.vision_model.*`, `language_model.model.*`, `language_model.lm_head.*`,
  `multi_modal_projector.*`. transformers 5 saves the tower as `vision_tower.*` and newer
  checkpoints use `model.*` prefixes; both are renamed here, shard by shard. Qwen2.5-VL and
  Qwen3-VL: the weights as they are (vLLM maps transformers' names itself).
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vlmzip.api import load_saved_config
from vlmzip.config import VisionZipConfig
from vlmzip.outputs import refuse_overlap, replacing_directory
from vlmzip.serving.settings import (
    CONFIG_FILENAME,
    PLUGIN_ARCHITECTURES,
    SERVABLE_ARCHITECTURES,
    check_servable,
)

WEIGHTS_INDEX = "model.safetensors.index.json"
SERVABLE_ARCHITECTURE_OF = {model_type: name for name, model_type in SERVABLE_ARCHITECTURES.items()}
# Files not copied as they are: rewritten (config, weights) or not servable by vLLM's loader.
_REWRITTEN = {"config.json", CONFIG_FILENAME, WEIGHTS_INDEX}
# Checkpoint prefixes -> vLLM LLaVA's module names, first match wins.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def vllm_weight_name(name: str) -> str:
    """The name vLLM's LLaVA loader expects for checkpoint tensor `name`."""
    for old, new in _PREFIXES:
        if name.startswith(old):
            name = new + name[len(old) :]
            break
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name[len("vision_tower.") :]
    return name


def _load_hf_config(model_dir: Path):  # noqa: ANN202 - a transformers PreTrainedConfig
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"--model {model_dir}: not a transformers model directory ({error})") from None


def _weight_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        legacy = sorted(p.name for p in model_dir.glob("*.bin"))
        hint = f" (found {legacy}: load and save_pretrained() it with transformers first)" if legacy else ""
        raise ValueError(f"--model {model_dir}: no *.safetensors weights{hint}")
    return files


def _rename_shard(source: Path, target: Path, rename: Callable[[str], str]) -> list[str]:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), framework="pt") as shard:
        metadata = shard.metadata() or {}
        tensors = {rename(name): shard.get_tensor(name) for name in shard.keys()}  # noqa: SIM118
    if len(tensors) != len(set(tensors)):
        raise ValueError(f"{source}: two tensors map to the same vLLM name")
    save_file(tensors, str(target), metadata={**metadata, "format": "pt"})
    return list(tensors)


def export_model(
    model_dir: str | Path,
    out_dir: str | Path,
    config: VisionZipConfig | None = None,
    *,
    overwrite: bool = False,
    plugin: bool = True,
) -> VisionZipConfig:
    """Write `out_dir`: `model_dir` made servable by vLLM with the VisionZip plugin. Returns the budget.

    `config` defaults to `model_dir`'s own visionzip_config.json (e.g. from `vlmzip finetune`),
    else `VisionZipConfig()` (54 + 10). Everything is validated before `out_dir` is written.
    Without the budget arguments on the command line the same defaults apply. `plugin=False` writes
    the same weights for vLLM's own LLaVA (all visual tokens, no visionzip_config.json): a baseline.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not model_dir.is_dir():
        raise ValueError(f"--model {model_dir}: not a directory")
    refuse_overlap(out_dir, [("--model", model_dir)])
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"-o/--output {out_dir}: exists and is not a directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise ValueError(f"-o/--output {out_dir}: exists and is not empty (pass --force to overwrite)")
    if config is None:
        config = load_saved_config(model_dir) or VisionZipConfig()
    if not isinstance(config, VisionZipConfig):
        raise TypeError(f"config must be a VisionZipConfig, got {type(config).__name__}")
    hf_config = _load_hf_config(model_dir)
    architectures = list(getattr(hf_config, "architectures", None) or [])
    if not set(architectures) & (set(SERVABLE_ARCHITECTURES) | set(PLUGIN_ARCHITECTURES.values())):
        raise ValueError(
            f"--model {model_dir}: unsupported architecture {architectures}; export supports "
            f"{sorted(SERVABLE_ARCHITECTURES)}"
        )
    check_servable(hf_config, config)
    shards = _weight_files(model_dir)
    # Written beside out_dir and swapped in at the end: nothing of a previous export remains (stale
    # shards, index), and an interrupted export leaves the previous output as it was.
    with replacing_directory(out_dir) as staging:
        _write_export(model_dir, staging, shards, hf_config, config, plugin)
    return config


def _write_export(
    model_dir: Path, out_dir: Path, shards: list[Path], hf_config: Any, config: VisionZipConfig, plugin: bool
) -> None:
    for path in sorted(model_dir.iterdir()):
        if path.is_file() and path.name not in _REWRITTEN and path.suffix not in (".safetensors", ".bin"):
            shutil.copy2(path, out_dir / path.name)
    names: dict[str, str] = {}
    # vLLM's LLaVA loader wants CLIP under vision_tower.vision_model; other towers keep transformers' names.
    clip = getattr(hf_config.vision_config, "model_type", None) == "clip_vision_model"
    rename = vllm_weight_name if hf_config.model_type == "llava" and clip else str
    for shard in shards:
        for name in _rename_shard(shard, out_dir / shard.name, rename):
            names[name] = shard.name
    if len(shards) > 1 or (model_dir / WEIGHTS_INDEX).is_file():
        index = {"metadata": {}, "weight_map": dict(sorted(names.items()))}
        (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")

    raw_config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_type = raw_config["model_type"]
    raw_config["architectures"] = [PLUGIN_ARCHITECTURES[model_type] if plugin else SERVABLE_ARCHITECTURE_OF[model_type]]
    (out_dir / "config.json").write_text(json.dumps(raw_config, indent=2) + "\n", encoding="utf-8")
    if plugin:
        (out_dir / CONFIG_FILENAME).write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")


def _run(args: argparse.Namespace) -> int:
    from vlmzip.cli_options import budget_from_args

    budget = budget_from_args(args, default=None)  # none: the source directory's saved budget, if any
    if budget is None and args.method is not None:
        raise ValueError("--method needs a budget: pass --dominant and --contextual, or --tokens")
    config = None if budget is None else VisionZipConfig.from_budget(budget, method=args.method or "visionzip")
    if args.plain and (config is not None or args.method is not None):
        raise ValueError("--plain writes vLLM's own LLaVA with every visual token: it takes no budget or --method")
    model = args.model
    if model is None:  # the embedded default model, assembled on first use (no network)
        from vlmzip.default_model import default_model_dir

        model = default_model_dir()
    config = export_model(model, args.output, config, overwrite=args.force, plugin=not args.plain)
    if args.plain:
        print(f"wrote {args.output}: vLLM's own LLaVA, all visual tokens; serve it with: vllm serve {args.output}")
        return 0
    architecture = json.loads((Path(args.output) / "config.json").read_text(encoding="utf-8"))["architectures"][0]
    print(
        f"wrote {args.output}: {architecture}, {config.dominant} + {config.contextual} = {config.tokens} "
        f"tokens per image ({config.method}); serve it with: vllm serve {args.output}"
    )
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Write a model directory that `vllm serve` runs with VisionZip (LLaVA-1.5, Qwen2.5-VL, Qwen3-VL)."
    sub = subcommands.add_parser(
        "export",
        help=help_text,
        description=help_text + " The budget is stored in visionzip_config.json; at serve time --hf-overrides "
        '\'{"visionzip": {"dominant": D, "contextual": C}}\' changes it. Needs the visionzip vLLM plugin '
        "installed where vLLM runs (pip install 'vlmzip[vllm]').",
    )
    sub.add_argument(
        "--model",
        help="transformers LLaVA-1.5, Qwen2.5-VL or Qwen3-VL model directory (safetensors weights); default: the "
        "embedded default model (LLaVA with a DINOv2 tower)",
    )
    sub.add_argument("-o", "--output", required=True, help="directory to write (new or empty; outside --model)")
    budget = sub.add_mutually_exclusive_group()
    budget.add_argument("--dominant", type=int, help="dominant tokens per image, [CLS] included (with --contextual)")
    budget.add_argument("--tokens", type=int, help="total tokens per image, split as the paper does (64 = 54 + 10)")
    sub.add_argument("--contextual", type=int, help="contextual (merged) tokens per image (with --dominant)")
    sub.add_argument("--method", help="reduction method, with a budget (default: visionzip)")
    sub.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty output directory (as a whole, once complete)",
    )
    sub.add_argument(
        "--plain", action="store_true", help="write vLLM's own LLaVA instead (every visual token; a baseline)"
    )
    sub.set_defaults(run=_run)
