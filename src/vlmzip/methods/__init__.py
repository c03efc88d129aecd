"""Token-reduction methods, selectable by name.

Each method maps a probed feature layer to `dominant + contextual` tokens per image. Adding one
is one file: define a function `(probe, config) -> Reduction` and decorate it with
`@register_method("name")`, then import the module below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmzip.config import VisionZipConfig
    from vlmzip.core import Reduction
    from vlmzip.probe import ProbeOutput

ReductionMethod = Callable[["ProbeOutput", "VisionZipConfig"], "Reduction"]
_METHODS: dict[str, ReductionMethod] = {}


def register_method(name: str) -> Callable[[ReductionMethod], ReductionMethod]:
    def decorator(function: ReductionMethod) -> ReductionMethod:
        if name in _METHODS:
            raise ValueError(f"reduction method {name!r} is already registered")
        _METHODS[name] = function
        return function

    return decorator


def available_methods() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> ReductionMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"method must be one of {available_methods()}, got {name!r}") from None


# Registration happens on import; order here is the order shown to users.
from vlmzip.methods import divprune as _divprune  # noqa: E402,F401
from vlmzip.methods import pool as _pool  # noqa: E402,F401
from vlmzip.methods import random_keep as _random_keep  # noqa: E402,F401
from vlmzip.methods import tome as _tome  # noqa: E402,F401
from vlmzip.methods import visionzip as _visionzip  # noqa: E402,F401
