"""What `bench` and `eval` compare: the full-token model and every method at every budget.

A variant is (method, budget). "full" is the unmodified model (every visual token reaches the
language model); the pre-LLM methods (`vlmzip.methods.available_methods()`) reduce the visual
tokens before the language model through the family adapter; "fastv" prunes inside the language
model (`vlmzip.methods.fastv.FastV`), so it gets the full-length features and a context that
installs its hooks around generation. The model itself is never patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from vlmzip.adapters import adapter_class_for
from vlmzip.adapters.base import Adapter, prepare_unreduced
from vlmzip.cache import ImageCache
from vlmzip.config import FIXED_COUNT_METHODS, VisionZipConfig, check_int
from vlmzip.methods import available_methods
from vlmzip.methods.fastv import DEFAULT_LAYER, FASTV_METHOD, FastV
from vlmzip.model_parts import language_model_of

FULL = "full"
DEFAULT_BUDGETS: tuple[int, ...] = (192, 128, 64)


def all_methods() -> tuple[str, ...]:
    """Every method name `bench` and `eval` accept (pre-LLM methods, then FastV)."""
    return (*available_methods(), FASTV_METHOD)


@dataclass(frozen=True)
class Variant:
    """One configuration to measure: `method` at `budget` visual tokens per image (None: all of them).

    positions: the `VisionZipConfig.positions` scheme of pre-LLM methods. attention_mass (with
    min_dominant, max_dominant): an adaptive budget (`VisionZipConfig.attention_mass`); `budget` then
    gives the contextual count only (its paper split, e.g. 10 of 64) and each image chooses its dominant count.
    """

    method: str
    budget: int | None = None
    positions: str = "compact"
    attention_mass: float | None = None
    min_dominant: int = 1
    max_dominant: int | None = None

    @property
    def is_full(self) -> bool:
        return self.method == FULL

    @property
    def key(self) -> tuple[str, int | None, float | None]:
        """What tells results apart within one run: method, budget and attention mass."""
        return self.method, self.budget, self.attention_mass

    @property
    def label(self) -> str:
        if self.is_full:
            return FULL
        adaptive = f" p={self.attention_mass:g}" if self.attention_mass is not None else ""
        return f"{self.method}@{self.budget}{adaptive}"

    def config(self) -> VisionZipConfig:
        """The VisionZipConfig of a pre-LLM variant (validates every field)."""
        extra: dict[str, Any] = {"method": self.method, "positions": self.positions}
        if self.attention_mass is not None:
            extra.update(
                attention_mass=self.attention_mass, min_dominant=self.min_dominant, max_dominant=self.max_dominant
            )
        return VisionZipConfig.from_tokens(self.budget, **extra)


def build_variants(
    methods: Sequence[str],
    budgets: Sequence[int],
    *,
    include_full: bool = True,
    positions: str = "compact",
    attention_masses: Sequence[float] = (),
    min_dominant: int = 1,
    max_dominant: int | None = None,
) -> list[Variant]:
    """The full-token baseline first (when included), then every method at every budget, in the given order.

    With `attention_masses`, every pre-LLM method at every budget also runs adaptively at each mass (after
    the fixed budgets); `positions` applies to every pre-LLM variant. Bad values raise before anything runs.
    """
    known = all_methods()
    methods = list(dict.fromkeys(methods))
    for method in methods:
        if method not in known:
            raise ValueError(f"methods must be among {known}, got {method!r}")
    budgets = [check_int("budget", budget, 1) for budget in dict.fromkeys(budgets)]
    if not methods or not budgets:
        raise ValueError("methods and budgets must not be empty")
    masses = list(dict.fromkeys(attention_masses))
    adaptive_methods = [m for m in methods if m != FASTV_METHOD and m not in FIXED_COUNT_METHODS]
    if masses and not adaptive_methods:
        raise ValueError(
            f"attention_mass (adaptive budget) applies to the pre-LLM methods other than {FIXED_COUNT_METHODS}, "
            f"got methods {methods}"
        )
    variants = [Variant(FULL)] if include_full else []
    variants += [Variant(method, budget, positions) for method in methods for budget in budgets]
    variants += [
        Variant(method, budget, positions, mass, min_dominant, max_dominant)
        for method in adaptive_methods
        for budget in budgets
        for mass in masses
    ]
    for variant in variants:
        if not variant.is_full and variant.method != FASTV_METHOD:
            variant.config()  # every field checked now, with its name in the error
    return variants


def unit_tokens(model: nn.Module, inputs: Mapping[str, Any]) -> int:
    """Tokens the vision tower yields per image (or crop) for these processor outputs, [CLS] included.

    Only FastV needs this count (see `VariantRunner`); families whose images have no fixed count (Qwen's
    native resolution) do not provide it.
    """
    reference = adapter_class_for(model)(model, VisionZipConfig(dominant=1, contextual=0))
    try:
        return reference.budget_unit_tokens(inputs)
    except NotImplementedError:
        raise ValueError(f"model: {type(model).__name__} has no fixed number of tower tokens per image") from None


class VariantRunner:
    """Turns processor outputs into model inputs for one variant, and the context generation runs in.

    FastV keeps the same share of each image's tokens as the pre-LLM methods at the same budget:
    `budget` of the tower's `unit_tokens` per image or crop (`unit_tokens(model, inputs)`), e.g. 64 of
    LLaVA-1.5's 577, which is 64 of its 576 placeholders. fastv_layer is FastV's K; language models
    with K layers or fewer use their number of layers minus one.
    """

    def __init__(
        self, model: nn.Module, variant: Variant, unit_tokens: int | None = None, fastv_layer: int = DEFAULT_LAYER
    ) -> None:
        self.model = model
        self.variant = variant
        self.adapter: Adapter | None = None
        self.fastv: FastV | None = None
        if variant.method == FASTV_METHOD:
            reason = FastV.unsupported_reason(model)
            if reason is not None:  # before unit_tokens: some families (M-RoPE) have no fixed count to give
                raise ValueError(reason)
            if unit_tokens is None:
                raise ValueError("unit_tokens is required for FastV (see vlmzip.bench.variants.unit_tokens)")
            num_layers = len(language_model_of(model).layers)
            layer = max(1, min(fastv_layer, num_layers - 1))
            self.fastv = FastV(model, tokens=variant.budget, layer=layer, image_tokens=unit_tokens)
        elif not variant.is_full:
            self.adapter = adapter_class_for(model)(model, variant.config())  # validates; the model stays unpatched

    @staticmethod
    def needs_unit_tokens(variants: Sequence[Variant]) -> bool:
        """Whether any of `variants` needs `unit_tokens` (FastV's share of each image's tokens)."""
        return any(variant.method == FASTV_METHOD for variant in variants)

    @property
    def reduces_before_llm(self) -> bool:
        return self.adapter is not None

    def prepare(self, inputs: Mapping[str, Any], cache: ImageCache | None = None) -> dict[str, Any]:
        """Encode the images (tower, selection, projector) and hand the features over, as generate() needs.

        `cache`: reduced variants look the images up there first (see `vlmzip.ImageCache`).
        """
        if self.adapter is not None:
            return self.adapter.prepare(inputs, cache=cache)
        return prepare_unreduced(self.model, inputs)

    @contextlib.contextmanager
    def generating(self) -> Iterator[None]:
        """The context model.generate() must run in for this variant (FastV's hooks; nothing otherwise)."""
        if self.fastv is None:
            yield
            return
        with self.fastv:
            yield
