"""`vlmzip export-split`: write a split of the embedded model's VQA data.

The training recipe of the embedded model is not a command: it lives in the source repository
(`python -m recipes.default_model.train`).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path


def _export_split(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from vlmzip.default_model.data import export_split
    from vlmzip.outputs import embedded_model_inputs, refuse_overlap

    for option, value, least in (
        ("--images", args.images, 1),
        ("--per-type", args.per_type, 1),
        ("--seed", args.seed, 0),
    ):
        if value < least:
            parser.error(f"{option} must be an integer >= {least}, got {value}")
    for output in (args.output, args.output.parent / (args.output.stem + "_images")):
        refuse_overlap(output, embedded_model_inputs(), "OUTPUT")
    print(export_split(args.output, args.split, args.images, args.seed, args.per_type, overwrite=args.overwrite))
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    from vlmzip.default_model.data import DEFAULT_TEST_IMAGES, SPLITS

    help_text = "Write a split of the embedded model's VQA data as JSONL + PNG files."
    sub = subcommands.add_parser(
        "export-split",
        help=help_text,
        description=help_text + " The images go to <stem>_images/ beside the JSONL file.",
    )
    sub.add_argument("output", type=Path, help="JSONL file to write")
    sub.add_argument("--split", default="test", choices=SPLITS, help="default: %(default)s")
    sub.add_argument("--images", type=int, default=DEFAULT_TEST_IMAGES, help="number of scenes (default: %(default)s)")
    sub.add_argument("--per-type", type=int, default=1, help="questions of each type per scene (default: %(default)s)")
    sub.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    sub.add_argument("--overwrite", action="store_true", help="replace an existing file and its image folder")
    sub.set_defaults(run=functools.partial(_export_split, parser=sub))
