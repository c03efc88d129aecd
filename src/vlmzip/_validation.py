"""Argument checks shared by the config, the core and the methods.

A leaf module (it imports nothing from the package), so that every module can validate its arguments
without import cycles.
"""

from __future__ import annotations

import numbers
from typing import Any, Literal

import torch

MergeMode = Literal["target_plus_mean", "average"]
MERGE_MODES: tuple[str, ...] = ("target_plus_mean", "average")


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    """Return `value` as an int, or raise naming `name` and the allowed range.

    bool is refused although it is an int subclass: `dominant=True` is always a mistake.
    """
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer {bounds}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        raise ValueError(f"{name} must be an integer {bounds}, got {value}")
    return value


def check_fraction(name: str, value: Any) -> float:
    """Return `value` as a float in (0, 1], or raise naming `name` and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1], got {type(value).__name__} {value!r}")
    value = float(value)
    if not 0.0 < value <= 1.0:  # also refuses NaN
        raise ValueError(f"{name} must be a number in (0, 1], got {value}")
    return value


def check_tensor(name: str, value: Any, ndim: int) -> torch.Tensor:
    """Return `value` if it is a torch.Tensor of `ndim` dimensions, or raise naming `name` and the shape."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(value.shape)}")
    return value


def budget_error(config: Any, available: int, where: str) -> ValueError:
    """The error for a budget (`config`: dominant, contextual, tokens) above the `available` tokens; `where`
    says what they are, e.g. " (the tokens of one tile)". An adaptive budget names its fewest tokens."""
    if getattr(config, "adaptive", False):  # the fewest tokens an adaptive budget can give a unit
        return ValueError(
            f"min_dominant + contextual must be <= {available}{where}, got {config.min_dominant} + "
            f"{config.contextual} = {config.fewest_tokens}"
        )
    return ValueError(
        f"dominant + contextual must be <= {available}{where}, got {config.dominant} + {config.contextual} = "
        f"{config.tokens}"
    )
