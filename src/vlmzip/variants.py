"""Which variant to run, shared by `bench`, `eval` and the lmms-eval plugin: the full-token model and
every method at every budget.

A variant is (method, budget). "full" is the unmodified model (every visual token reaches the
language model); the methods before the language model (`vlmzip.methods.available_methods()`) reduce
the visual tokens through the family adapter; those inside it (`available_methods(INSIDE_LLM)`, e.g.
"fastv") get the full-length features and a context that installs their hooks around generation.
The model itself is never patched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from vlmzip.adapters import adapter_class_for, geometry_of
from vlmzip.adapters.base import Adapter, prepare_unreduced
from vlmzip.cache import ImageCache
from vlmzip.config import FIXED_COUNT_METHODS, VisionZipConfig, check_int
from vlmzip.methods import INSIDE_LLM, all_methods, get_pruner, method_kind
from vlmzip.methods.fastv import DEFAULT_LAYER
from vlmzip.model_parts import language_model_of

FULL = "full"
DEFAULT_BUDGETS: tuple[int, ...] = (192, 128, 64)
# The paper's split of the lmms-eval plugin's default budget.
DEFAULT_SPLIT = (54, 10)


@dataclass(frozen=True)
class Variant:
    """One configuration to measure: `method` at `budget` visual tokens per image (None: all of them).

    positions: the `VisionZipConfig.positions` scheme of pre-LLM methods. attention_mass (with
    min_dominant, max_dominant): an adaptive budget (`VisionZipConfig.attention_mass`); `budget` then
    gives the contextual count only (its paper split, e.g. 10 of 64) and each image chooses its dominant count.
    contextual: a split of `budget` of one's own (`budget - contextual` dominant tokens), instead of the paper's.
    """

    method: str
    budget: int | None = None
    positions: str = "compact"
    attention_mass: float | None = None
    min_dominant: int = 1
    max_dominant: int | None = None
    contextual: int | None = None

    @property
    def is_full(self) -> bool:
        return self.method == FULL

    @property
    def inside_llm(self) -> bool:
        """Whether the method prunes inside the language model (registered with kind INSIDE_LLM)."""
        return not self.is_full and method_kind(self.method) == INSIDE_LLM

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
        if self.contextual is not None:
            check_int("contextual", self.contextual, 0)
            return VisionZipConfig.from_budget(
                (check_int("budget", self.budget, 1) - self.contextual, self.contextual), **extra
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
    adaptive_methods = [m for m in methods if method_kind(m) != INSIDE_LLM and m not in FIXED_COUNT_METHODS]
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
        if not variant.is_full and not variant.inside_llm:
            variant.config()  # every field checked now, with its name in the error
    return variants


def single_variant(
    method: str = "visionzip",
    tokens: int | None = None,
    dominant: int | None = None,
    contextual: int | None = None,
) -> Variant:
    """The one variant of a tool that runs one budget: `method` ("full", or any registered method) at
    `tokens` (the paper's split) or `dominant + contextual` (default 54 + 10). Bad values raise here."""
    if method != FULL and method not in all_methods():
        raise ValueError(f"method must be one of {(FULL, *all_methods())}, got {method!r}")
    if tokens is not None and (dominant is not None or contextual is not None):
        raise ValueError("give tokens or dominant/contextual, not both")
    if tokens is None:
        dominant = DEFAULT_SPLIT[0] if dominant is None else check_int("dominant", dominant, 1)
        contextual = DEFAULT_SPLIT[1] if contextual is None else check_int("contextual", contextual, 0)
        variant = Variant(method, dominant + contextual, contextual=contextual)
    else:
        variant = Variant(method, check_int("tokens", tokens, 1))
    if not variant.is_full and not variant.inside_llm:
        variant.config()  # every field checked now, with its name in the error
    return variant


def unit_tokens(model: nn.Module, inputs: Mapping[str, Any] | None = None, processor: Any = None) -> int:
    """Tokens the vision tower yields per image (or crop), [CLS] included: for these processor outputs,
    or without `inputs` at the processor's input size (`FamilyGeometry.tokens_per_unit`).

    Only the methods inside the language model need this count (see `VariantRunner`); families whose
    images have no fixed count (Qwen's native resolution) do not provide it.
    """
    geometry = geometry_of(model, processor)
    try:
        return geometry.budget_unit_tokens(inputs) if inputs is not None else geometry.tokens_per_unit()
    except NotImplementedError:
        raise ValueError(f"model: {type(model).__name__} has no fixed number of tower tokens per image") from None


class VariantRunner:
    """Turns processor outputs into model inputs for one variant, and the context generation runs in.

    A method inside the language model (FastV) keeps the same share of each image's tokens as the
    methods before it at the same budget: `budget` of the tower's `unit_tokens` per image or crop
    (`unit_tokens(model, inputs)`), e.g. 64 of LLaVA-1.5's 577, which is 64 of its 576 placeholders.
    fastv_layer is its K; language models with K layers or fewer use their number of layers minus one.
    """

    def __init__(
        self, model: nn.Module, variant: Variant, unit_tokens: int | None = None, fastv_layer: int = DEFAULT_LAYER
    ) -> None:
        self.model = model
        self.variant = variant
        self.adapter: Adapter | None = None
        self.pruner: Any = None  # the installed-around-generate() method inside the language model
        if variant.inside_llm:
            pruner = get_pruner(variant.method)
            reason = pruner.unsupported_reason(model)
            if reason is not None:  # before unit_tokens: some families (M-RoPE) have no fixed count to give
                raise ValueError(reason)
            if unit_tokens is None:
                raise ValueError(f"unit_tokens is required for {variant.method} (see vlmzip.variants.unit_tokens)")
            num_layers = len(language_model_of(model).layers)
            layer = max(1, min(fastv_layer, num_layers - 1))
            self.pruner = pruner(model, tokens=variant.budget, layer=layer, image_tokens=unit_tokens)
        elif not variant.is_full:
            self.adapter = adapter_class_for(model)(model, variant.config())  # validates; the model stays unpatched

    @staticmethod
    def needs_unit_tokens(variants: Sequence[Variant]) -> bool:
        """Whether any of `variants` needs `unit_tokens` (a method inside the language model)."""
        return any(variant.inside_llm for variant in variants)

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
        """The context model.generate() must run in for this variant (the pruner's hooks; nothing otherwise)."""
        if self.pruner is None:
            yield
            return
        with self.pruner:
            yield
