"""Token-reduction methods, selectable by name, of two kinds.

Before the language model (`BEFORE_LLM`): a function `(probe, config) -> Reduction` that maps a probed
feature layer to `dominant + contextual` tokens per image; the family adapters run it, and
`VisionZipConfig(method=...)` names one. Adding one is one file: define the function, decorate it with
`@register_method("name")`, then import the module below.

Inside the language model (`INSIDE_LLM`): a class that prunes visual tokens between decoder layers
(it needs the prompt), registered with `@register_method("name", kind=INSIDE_LLM)`. It is built as
`cls(model, tokens=..., layer=..., image_tokens=...)`, installs its hooks as a context manager around
`generate()`, keeps the positions it kept in `last_kept`, and says why it cannot run on a model with
the static method `unsupported_reason(model)` (None when it can). FastV is one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from vlmzip.config import VisionZipConfig
    from vlmzip.core import Reduction
    from vlmzip.probe import ProbeOutput

ReductionMethod = Callable[["ProbeOutput", "VisionZipConfig"], "Reduction"]
BEFORE_LLM = "before_llm"
INSIDE_LLM = "inside_llm"
METHOD_KINDS: tuple[str, ...] = (BEFORE_LLM, INSIDE_LLM)
_METHODS: dict[str, Any] = {}  # name -> a reduction function (before the LLM) or a pruning class (inside it)
_KINDS: dict[str, str] = {}
Registered = TypeVar("Registered")


def register_method(name: str, kind: str = BEFORE_LLM) -> Callable[[Registered], Registered]:
    if kind not in METHOD_KINDS:
        raise ValueError(f"kind must be one of {METHOD_KINDS}, got {kind!r}")

    def decorator(method: Registered) -> Registered:
        if name in _METHODS:
            raise ValueError(f"reduction method {name!r} is already registered")
        _METHODS[name] = method
        _KINDS[name] = kind
        return method

    return decorator


def available_methods(kind: str = BEFORE_LLM) -> tuple[str, ...]:
    """The registered methods of one kind (default: those before the language model, which
    `VisionZipConfig(method=...)` accepts), in registration order."""
    if kind not in METHOD_KINDS:
        raise ValueError(f"kind must be one of {METHOD_KINDS}, got {kind!r}")
    return tuple(name for name, method_kind in _KINDS.items() if method_kind == kind)


def all_methods() -> tuple[str, ...]:
    """Every registered method: those before the language model, then those inside it."""
    return tuple(name for kind in METHOD_KINDS for name in available_methods(kind))


def method_kind(name: str) -> str:
    """`BEFORE_LLM` or `INSIDE_LLM`: where the method named `name` reduces the visual tokens."""
    try:
        return _KINDS[name]
    except KeyError:
        raise ValueError(f"method must be one of {all_methods()}, got {name!r}") from None


def get_method(name: str) -> ReductionMethod:
    """The reduction function of a method before the language model."""
    if _KINDS.get(name) != BEFORE_LLM:
        raise ValueError(f"method must be one of {available_methods()}, got {name!r}")
    return _METHODS[name]


def get_pruner(name: str) -> Any:
    """The pruning class of a method inside the language model (e.g. `FastV` for "fastv")."""
    if _KINDS.get(name) != INSIDE_LLM:
        raise ValueError(f"method must be one of {available_methods(INSIDE_LLM)}, got {name!r}")
    return _METHODS[name]


# Registration happens on import; order here is the order shown to users.
from vlmzip.methods import divprune as _divprune  # noqa: E402,F401
from vlmzip.methods import fastv as _fastv  # noqa: E402,F401,I001
from vlmzip.methods import pool as _pool  # noqa: E402,F401
from vlmzip.methods import random_keep as _random_keep  # noqa: E402,F401
from vlmzip.methods import tome as _tome  # noqa: E402,F401
from vlmzip.methods import visionzip as _visionzip  # noqa: E402,F401
