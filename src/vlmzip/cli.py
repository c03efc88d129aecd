"""The `vlmzip` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# The project never downloads at run time; make transformers fail fast instead of waiting on a network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class UserError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2.

    ValueError/TypeError from the library (bad budgets, unsupported models) are reported the same
    way; set VLMZIP_DEBUG=1 to see the traceback instead.
    """


def _info(args: argparse.Namespace) -> int:
    import torch
    import transformers

    import vlmzip
    from vlmzip.adapters import supported_families
    from vlmzip.methods import available_methods
    from vlmzip.probe import supported_towers

    print(f"vlmzip     {vlmzip.__version__}")
    print(f"torch         {torch.__version__} (cuda available: {torch.cuda.is_available()})")
    print(f"transformers  {transformers.__version__}")
    print(f"families      {', '.join(supported_families())}")
    print(f"towers        {', '.join(supported_towers())}")
    print(f"methods       {', '.join(available_methods())}")
    return 0


def _add_info(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Show versions, supported model families, towers and reduction methods."
    sub = subcommands.add_parser("info", help=help_text, description=help_text)
    sub.set_defaults(run=_info)


# Modules that add commands: each has `register(subcommands)`, which adds one or more sub-parsers
# with `set_defaults(run=function)`; `function(args) -> int` is the exit status. This is the one way
# a command is exposed (a module's own `python -m` entry point, where kept, hands its arguments to
# `main` under the command's name). Imported lazily in `register` bodies so that `vlmzip --help`
# stays fast.
COMMAND_MODULES: tuple[str, ...] = (
    "vlmzip.demo",
    "vlmzip.default_model.commands",
    "vlmzip.viz_cli",
    "vlmzip.finetune",
    "vlmzip.export",
    "vlmzip.bench.cli",
    "vlmzip.bench.tower",
    "vlmzip.serving.bench_vllm",
    "vlmzip.eval.cli",
)


def command_name() -> str:
    """The name the command was run by: ``visionzip`` (the method's name) or ``vlmzip``, for help and errors."""
    return "visionzip" if os.path.basename(sys.argv[0]) == "visionzip" else "vlmzip"


def build_parser() -> argparse.ArgumentParser:
    prog = command_name()
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "VisionZip: make vision-language models fast by sending the language model far fewer visual "
            "tokens. Dominant tokens are kept by [CLS] attention at the feature layer, the rest are merged "
            "into a few contextual tokens, before the language model and independent of the text."
        ),
        epilog=f"Run '{prog} COMMAND --help' for the options of each command.",
    )
    from vlmzip import __version__

    parser.add_argument("--version", action="version", version=f"vlmzip {__version__}")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_info(subcommands)
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subcommands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if getattr(args, "run", None) is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except (UserError, ValueError, TypeError, OSError, ImportError) as error:
        if os.environ.get("VLMZIP_DEBUG"):
            raise
        print(f"{parser.prog} {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog} {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
