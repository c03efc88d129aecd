"""`vlmzip export-split`: write a split of the embedded model's VQA data.

It hands its arguments on unparsed to the data module's own parser (`vlmzip export-split --help`).
The training recipe of the embedded model is not a command: it lives in the source repository
(`python -m recipes.default_model.train`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def export_split(argv: Sequence[str]) -> int:
    from vlmzip.default_model import data

    return int(data.main(list(argv)) or 0)


PASSTHROUGH = {
    "export-split": (
        export_split,
        "Write a split of the embedded model's VQA data as JSONL + PNG files (see 'vlmzip export-split --help').",
    ),
}


def register(subcommands: argparse._SubParsersAction) -> None:
    # Listed in `vlmzip --help`; cli.main dispatches these before parsing (see PASSTHROUGH).
    for name, (_, help_text) in PASSTHROUGH.items():
        subcommands.add_parser(name, help=help_text, description=help_text)
