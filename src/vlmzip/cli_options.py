"""Command-line options shared by the commands: the token budget, the methods x budgets to compare, the model.

One budget (`demo`, `show`): `--tokens N` (split as the paper does, 64 = 54 + 10) or `--dominant D
--contextual C` together, plus `--method`; the default is 64 tokens. Several budgets (`bench`, `eval`):
`--methods M ...` and `--tokens N ...`, every method at every budget against all tokens.
Heavy modules are imported inside the functions so that building the parser stays fast.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from vlmzip.config import VisionZipConfig, check_int

if TYPE_CHECKING:
    from vlmzip.variants import Variant

# The weight dtypes every command (--dtype) and the lmms-eval plugin (dtype=) accept, by torch's names.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
DEFAULT_TOKENS = 64  # the paper's 54 + 10
APP_HOST = "127.0.0.1"  # the web demo listens on this machine only unless told otherwise
APP_PORT = 7860


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    """Add --tokens, --dominant, --contextual and --method to `parser` (read back with `config_from_args`)."""
    parser.add_argument(
        "--tokens",
        type=int,
        metavar="N",
        help=f"visual tokens per image, split as the paper does (64 = 54 + 10, 128, 192; default {DEFAULT_TOKENS})",
    )
    parser.add_argument("--dominant", type=int, metavar="D", help="dominant tokens ([CLS] included); with --contextual")
    parser.add_argument("--contextual", type=int, metavar="C", help="contextual (merged) tokens; with --dominant")
    parser.add_argument("--method", default="visionzip", help="reduction method ('vlmzip info'; default visionzip)")
    add_position_options(parser)
    add_adaptive_options(parser, several=False)


def add_position_options(parser: argparse.ArgumentParser) -> None:
    """Add --positions (VisionZipConfig.positions) to `parser`."""
    from vlmzip.config import POSITION_SCHEMES

    parser.add_argument(
        "--positions",
        choices=POSITION_SCHEMES,
        default="compact",
        help="position ids of the reduced tokens: compact (renumbered, the paper's; default) or original (as in "
        "the unreduced prompt; 1-D position models; M-RoPE models always keep the original ones)",
    )


def add_adaptive_options(parser: argparse.ArgumentParser, *, several: bool) -> None:
    """Add --attention-mass (one value, or several with `several`), --min-dominant and --max-dominant."""
    parser.add_argument(
        "--attention-mass",
        type=float,
        nargs="+" if several else None,
        metavar="P",
        help="adaptive budget: each image (crop, frame) keeps dominant tokens until they hold this share of its "
        "attention, in (0, 1]; the budget's contextual count stays"
        + ("; several values give one adaptive variant each, besides the fixed budgets" if several else ""),
    )
    parser.add_argument("--min-dominant", type=int, default=1, help="adaptive budget: fewest dominant tokens (1)")
    parser.add_argument("--max-dominant", type=int, help="adaptive budget: most dominant tokens (default: no limit)")


def adaptive_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """VisionZipConfig fields of --positions and the adaptive options (empty of those not given)."""
    fields: dict[str, Any] = {"positions": getattr(args, "positions", "compact")}
    mass = getattr(args, "attention_mass", None)
    minimum, maximum = getattr(args, "min_dominant", 1), getattr(args, "max_dominant", None)
    if mass is not None:
        fields.update(attention_mass=mass, min_dominant=minimum, max_dominant=maximum)
    elif minimum != 1 or maximum is not None:
        raise ValueError("--min-dominant and --max-dominant apply to adaptive budgets: give --attention-mass too")
    return fields


def budget_from_args(args: argparse.Namespace, default: int | None = DEFAULT_TOKENS) -> int | tuple[int, int] | None:
    """The budget the options give: `--tokens N`, or (`--dominant`, `--contextual`) given together; `default`
    (64 tokens, or None for commands whose budget is optional) when none is given."""
    tokens, dominant, contextual = args.tokens, args.dominant, args.contextual
    if tokens is not None:
        check_int("tokens", tokens, 1)
    if dominant is not None:
        check_int("dominant", dominant, 1)
    if contextual is not None:
        check_int("contextual", contextual, 0)
    split_given = dominant is not None or contextual is not None
    if tokens is not None and split_given:
        raise ValueError("give either --tokens or --dominant/--contextual, not both")
    if split_given:
        if dominant is None or contextual is None:
            raise ValueError("--dominant and --contextual must be given together")
        return dominant, contextual
    return default if tokens is None else tokens


def config_from_args(args: argparse.Namespace) -> VisionZipConfig:
    """VisionZipConfig of the budget options and --method (bad values fail here, before any loading)."""
    return VisionZipConfig.from_budget(budget_from_args(args), method=args.method, **adaptive_from_args(args))


def add_variant_options(parser: argparse.ArgumentParser, *, methods_help: str, tokens_help: str) -> None:
    """Add --methods and --tokens (several of each) to `parser` (read back with `variants_from_args`)."""
    from vlmzip.methods import all_methods

    parser.add_argument("--methods", nargs="+", help=f"{methods_help}, of {all_methods()}")
    parser.add_argument("--tokens", nargs="+", type=int, metavar="N", help=tokens_help)
    add_position_options(parser)
    add_adaptive_options(parser, several=True)


def variants_from_args(
    args: argparse.Namespace, default_budgets: Sequence[int], model: Any = None, console: Any = None
) -> list[Variant]:
    """The full-token baseline, then every --methods method at every --tokens budget (or `default_budgets`).

    Without `model`, every method name is checked (call it before loading anything); with it, the
    methods the model cannot run are left out of the default list or refused (see `methods_for`).
    """
    from vlmzip.methods import all_methods
    from vlmzip.variants import build_variants

    budgets = args.tokens or default_budgets
    fields = adaptive_from_args(args)
    options = {
        "positions": fields["positions"],
        "attention_masses": fields.get("attention_mass") or (),
        "min_dominant": fields.get("min_dominant", 1),
        "max_dominant": fields.get("max_dominant"),
    }
    if model is None:
        return build_variants(args.methods or all_methods(), budgets, **options)
    return build_variants(methods_for(model, args.methods, console), budgets, **options)


def methods_for(model: Any, requested: Sequence[str] | None, console: Any = None) -> list[str]:
    """The methods to run on `model`: `requested` as given, or every method when None.

    Methods inside the language model cannot run on some models (FastV on M-RoPE): they are left out
    of the default list (said once on `console` when given) and refused when requested by name.
    """
    from vlmzip.methods import INSIDE_LLM, all_methods, available_methods, get_pruner

    reasons = {name: get_pruner(name).unsupported_reason(model) for name in available_methods(INSIDE_LLM)}
    if requested is not None:
        for name in requested:
            if reasons.get(name) is not None:
                raise ValueError(f"--methods {name}: {reasons[name].removeprefix('model: ')}")
        return list(requested)
    for name, reason in reasons.items():
        if reason is not None and console is not None:
            console.print(f"{name} left out: {reason.removeprefix('model: ')}", soft_wrap=True)
    return [method for method in all_methods() if reasons.get(method) is None]


def dtype_named(name: str, parameter: str = "--dtype") -> Any:
    """The torch dtype called `name` (one of DTYPE_NAMES), or a ValueError naming `parameter` and the choices."""
    import torch

    if name not in DTYPE_NAMES:
        raise ValueError(f"{parameter} must be one of {', '.join(DTYPE_NAMES)}, got {name!r}")
    return getattr(torch, name)


def check_device(device: str) -> str:
    """`--device` as given, refused when it names CUDA on a machine without it."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available")
    return device


def check_model_dir(model_dir: str | None) -> None:
    """Refuse a `--model` that names no directory, naming the option: before loading it, and before an error
    about what else `--model` needs (`--data`) could hide the typo."""
    from pathlib import Path

    if model_dir is not None and not Path(model_dir).is_dir():
        raise FileNotFoundError(f"--model: model directory not found: {model_dir}")


def load_model_for_cli(
    model_dir: str | None, *, dtype: Any = None, alternatives: str = "--model DIR"
) -> tuple[Any, Any]:
    """(model, processor) from `model_dir`, or the embedded default model, with one-line errors.

    dtype: torch dtype of the weights (default float32); alternatives: what the error suggests
    when the embedded model is missing.
    """
    import torch

    from vlmzip.cli import UserError
    from vlmzip.loading import load_model

    dtype = torch.float32 if dtype is None else dtype
    if model_dir is not None:
        check_model_dir(model_dir)
        return load_model(model_dir, dtype=dtype)
    try:
        return load_model(None, dtype=dtype)
    except (ImportError, OSError, RuntimeError, ValueError) as error:
        raise UserError(f"the embedded default model is not available ({error}); pass {alternatives}") from None
