"""`vlmzip finetune`: the command line of projector fine-tuning."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path
from typing import Any

from vlmzip.config import VisionZipConfig, check_int
from vlmzip.finetune.options import DEFAULT_PER_TYPE, DEFAULT_TRAIN_IMAGES, SCHEDULERS, FinetuneOptions
from vlmzip.finetune.run_directory import RunDirectory
from vlmzip.finetune.train import finetune_projector
from vlmzip.finetune.trainer import require_trainer
from vlmzip.outputs import model_inputs


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Fine-tune only the projector on reduced tokens (VisionZip with projector tuning)."
    sub = subcommands.add_parser(
        "finetune",
        help=help_text,
        description=help_text + " The tower and the language model stay frozen; the result is a model directory whose "
        "visionzip_config.json makes vlmzip.apply(model) use the budget it was tuned for.",
    )
    sub.add_argument("--model", help="model directory (default: the embedded default model)")
    sub.add_argument(
        "--data",
        help="VQA JSONL file (image, question, answers per line); default: the embedded model's training split",
    )
    sub.add_argument("-o", "--output", required=True, help="output directory (refused if it exists, see --overwrite)")
    budget = sub.add_argument_group("budget (per image; default 54 + 10)")
    budget.add_argument("--tokens", type=int, help="total tokens, split as the paper does (64 = 54 + 10)")
    budget.add_argument("--dominant", type=int, help="tokens kept by attention ([CLS] included)")
    budget.add_argument("--contextual", type=int, help="merged contextual tokens")
    budget.add_argument("--method", default="visionzip", help="reduction method (default: visionzip)")
    from vlmzip.cli_options import add_position_options

    add_position_options(budget)
    defaults = FinetuneOptions()
    train = sub.add_argument_group("training")
    train.add_argument(
        "--epochs", type=float, default=defaults.epochs, help="passes over the data (default: %(default)s)"
    )
    train.add_argument("--max-steps", type=int, help="optimizer steps in total (overrides --epochs)")
    train.add_argument("--batch-size", type=int, default=defaults.batch_size, help="default: %(default)s")
    train.add_argument(
        "--lr", type=float, default=defaults.learning_rate, help="peak learning rate (default: %(default)s)"
    )
    train.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio, help="default: %(default)s")
    train.add_argument("--scheduler", choices=SCHEDULERS, default=defaults.scheduler, help="default: %(default)s")
    train.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="default: %(default)s")
    train.add_argument(
        "--save-steps", type=int, default=defaults.save_steps, help="checkpoint interval (default: %(default)s)"
    )
    train.add_argument("--logging-steps", type=int, default=defaults.logging_steps, help="default: %(default)s")
    train.add_argument("--seed", type=int, default=defaults.seed, help="default: %(default)s")
    train.add_argument("--limit", type=int, help="use the first N records only")
    train.add_argument(
        "--train-images",
        type=int,
        default=DEFAULT_TRAIN_IMAGES,
        help="without --data: scenes of the embedded model's training split (default: %(default)s)",
    )
    train.add_argument(
        "--per-type",
        type=int,
        default=DEFAULT_PER_TYPE,
        help="without --data: questions of each type per scene (default: %(default)s)",
    )
    train.add_argument("--prompt", help="prompt template with {question} (default: the processor's chat template)")
    train.add_argument("--no-cache", action="store_true", help="run the tower every step instead of once per image")
    run = sub.add_argument_group("run")
    run.add_argument("--on-error", choices=("stop", "skip"), default="stop", help="bad rows and images (default: stop)")
    run.add_argument("--resume", action="store_true", help="continue an interrupted run from its latest checkpoint")
    run.add_argument("--overwrite", action="store_true", help="replace an existing output (or interrupted run)")
    run.add_argument("--adapter-only", action="store_true", help="save only the projector weights (small)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars; loss lines only")
    sub.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    import tempfile

    from vlmzip.cli import UserError
    from vlmzip.cli_options import check_model_dir, config_from_args

    config = config_from_args(args)
    if args.data is not None:
        return _finetune_from_args(args, config, args.data)
    if args.model is not None:
        check_model_dir(args.model)
        raise UserError("--data is required with --model (the training split belongs to the embedded model)")
    from vlmzip.default_model.data import export_split

    images = check_int("--train-images", args.train_images, 1)
    per_type = check_int("--per-type", args.per_type, 1)
    RunDirectory(Path(args.output)).check(args.resume, args.overwrite, model_inputs(args.model))  # before any data
    with tempfile.TemporaryDirectory(prefix="vlmzip-finetune-") as folder:
        # Regenerated identically every time, so a resumed run sees the same data.
        data = export_split(Path(folder) / "train.jsonl", split="train", num_images=images, per_type=per_type)
        return _finetune_from_args(args, config, data)


# FinetuneOptions fields whose command-line option has another name (the others share the field's name).
_OPTION_DESTS = {"learning_rate": "lr", "prompt_template": "prompt"}


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `FinetuneOptions` fields the command line sets, by field name."""
    options = {
        f.name: getattr(args, _OPTION_DESTS.get(f.name, f.name))
        for f in fields(FinetuneOptions)
        if f.name != "cache_features"
    }
    options["cache_features"] = not args.no_cache
    return options


def _finetune_from_args(args: argparse.Namespace, config: VisionZipConfig, data: str | Path) -> int:
    from vlmzip.cli import UserError

    try:
        require_trainer()
    except ImportError as error:
        raise UserError(str(error)) from None
    result = finetune_projector(
        args.model,
        data,
        config,
        args.output,
        resume=args.resume,
        overwrite=args.overwrite,
        adapter_only=args.adapter_only,
        progress=not args.no_progress,
        **options_from_args(args),
    )
    for problem in result.problems:
        print(f"skipped: {problem}")
    print(
        f"fine-tuned the projector for {config.dominant} + {config.contextual} tokens on {result.examples} "
        f"examples ({result.images} images): {result.steps} steps, mean loss {result.train_loss:.4f}, "
        f"{result.precompute_seconds:.0f} s preparing + {result.train_seconds:.0f} s training -> {result.output_dir}"
    )
    return 0
