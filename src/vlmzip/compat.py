"""What differs between the transformers 5.x releases the project supports, detected once.

transformers 5.25 renamed the key/value cache argument and output field `past_key_values` to
`cache` (the old name still works there, with a FutureWarning). The name is read from the public
output dataclass, not from the version number, so any release that has the field uses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


def _cache_field() -> str:
    from transformers.modeling_outputs import CausalLMOutputWithPast

    names = {field.name for field in dataclasses.fields(CausalLMOutputWithPast)}
    return "cache" if "cache" in names else "past_key_values"


CACHE_ARGUMENT = _cache_field()  # the keyword of forward()/generate() and the field of their outputs
# Every name a caller may use for the cache (the deprecated one included), for checks on user arguments.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def output_cache(output: Any) -> Any:
    """The key/value cache a forward() or generate() output carries (None when it has none)."""
    return getattr(output, CACHE_ARGUMENT, None)


def passed_cache(kwargs: Mapping[str, Any]) -> Any:
    """The cache a forward call was given, under either name or any other (None when none was).

    A `transformers.Cache` among the arguments counts whatever its keyword, so a later rename cannot
    make a decoding step look like a prefill.
    """
    from transformers import Cache

    for name in CACHE_ARGUMENTS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return next((value for value in kwargs.values() if isinstance(value, Cache)), None)
