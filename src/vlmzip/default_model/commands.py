"""`vlmzip train-default` and `vlmzip export-split`: rebuild the embedded model, export its data.

Both hand their arguments on unparsed to the scripts' own parsers (`vlmzip train-default --help`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def train_default(argv: Sequence[str]) -> int:
    from vlmzip.default_model import train

    return int(train.main(list(argv)) or 0)


def export_split(argv: Sequence[str]) -> int:
    from vlmzip.default_model import data

    return int(data.main(list(argv)) or 0)


PASSTHROUGH = {
    "train-default": (
        train_default,
        "Rebuild the embedded default model from a seed (see 'vlmzip train-default --help').",
    ),
    "export-split": (
        export_split,
        "Write a split of the embedded model's VQA data as JSONL + PNG files (see 'vlmzip export-split --help').",
    ),
}


def register(subcommands: argparse._SubParsersAction) -> None:
    # Listed in `vlmzip --help`; cli.main dispatches these before parsing (see PASSTHROUGH).
    for name, (_, help_text) in PASSTHROUGH.items():
        subcommands.add_parser(name, help=help_text, description=help_text)
