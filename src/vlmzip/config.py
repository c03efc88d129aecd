"""VisionZipConfig: the token budget and options, with all validation in one place."""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from vlmzip._validation import MERGE_MODES, MergeMode, check_fraction, check_int

BudgetScope = Literal["per_crop", "per_image"]
BUDGET_SCOPES: tuple[str, ...] = ("per_crop", "per_image")
# Methods whose token count must tile the patch grid: an adaptive budget's free count does not fit them.
FIXED_COUNT_METHODS: tuple[str, ...] = ("pool",)
PositionScheme = Literal["compact", "original"]
POSITION_SCHEMES: tuple[str, ...] = ("compact", "original")

# The paper's (dominant, contextual) splits per image.
PAPER_SPLITS: dict[int, tuple[int, int]] = {64: (54, 10), 128: (108, 20), 192: (162, 30)}


def split_budget(tokens: int) -> tuple[int, int]:
    """Split a per-image token budget into (dominant, contextual).

    The paper's splits are used for 64/128/192; other budgets keep the same ratio
    (54:10, i.e. about 84 % dominant), with at least one dominant token ([CLS]'s slot).
    """
    tokens = check_int("tokens", tokens, 1)
    if tokens in PAPER_SPLITS:
        return PAPER_SPLITS[tokens]
    dominant = max(1, round(tokens * 54 / 64))
    return dominant, tokens - dominant


@dataclass(frozen=True)
class VisionZipConfig:
    """How many visual tokens to keep per image (or per crop / frame) and how.

    Args:
        dominant: tokens kept by attention, counting [CLS]'s own slot on towers that have one (>= 1).
        contextual: tokens made by merging the remaining ones (>= 0; 0 keeps dominant tokens only).
        feature_layer: encoder layer whose output feeds the projector; None uses the model's
            `vision_feature_layer` (LLaVA: -2).
        merge: "target_plus_mean" (the published behaviour: target token + mean of the tokens
            assigned to it) or "average" (plain average of the target and its assigned tokens).
        method: reduction method name from `vlmzip.methods.available_methods()`.
        seed: seed for methods that draw at random (e.g. "random").
        budget_scope: what `dominant` and `contextual` count for models that split one image into
            several crops (LLaVA-NeXT, OneVision) or a video into frames. "per_crop" (default): every
            crop / frame gets `dominant + contextual`. "per_image": the numbers are totals for one image
            (or video), split evenly over its actual crops / frames (see `per_unit`).
        temporal_threshold: videos only; None (default) is off. Otherwise a dominant token of a frame
            is dropped when its cosine similarity with the token at the same position of the previous
            frame is >= this value, in (0, 1] (see `vlmzip.video`).
        positions: position ids of the reduced sequence on models with 1-D positions. "compact"
            (default, the paper's): the reduced sequence is numbered as if the dropped tokens had never
            been there. "original": every kept token keeps the position id it had in the unreduced
            prompt, a contextual (merged) token takes the position of the token it was merged onto,
            and the text keeps its unreduced positions (so decoding continues where it would with all
            tokens). M-RoPE models (Qwen2-VL family) always keep original positions, whatever the value.
        attention_mass: None (default): every image (crop, frame) keeps `dominant` tokens. A number in
            (0, 1]: adaptive budget; each image (crop, frame) keeps its highest-scoring tokens until
            they hold this share of its [CLS] (or received) attention, clamped to
            [min_dominant, max_dominant]; `dominant` is then unused and `contextual` applies as given.
        min_dominant: adaptive budget only: fewest dominant tokens per unit ([CLS]'s slot included), >= 1.
        max_dominant: adaptive budget only: most dominant tokens per unit, >= min_dominant; None: as many
            as the unit has (minus `contextual`).
    """

    dominant: int = 54
    contextual: int = 10
    feature_layer: int | None = None
    merge: MergeMode = "target_plus_mean"
    method: str = "visionzip"
    seed: int = 0
    budget_scope: BudgetScope = "per_crop"
    temporal_threshold: float | None = None
    positions: PositionScheme = "compact"
    attention_mass: float | None = None
    min_dominant: int = 1
    max_dominant: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "dominant", check_int("dominant", self.dominant, 1))
        object.__setattr__(self, "contextual", check_int("contextual", self.contextual, 0))
        if self.feature_layer is not None:
            if isinstance(self.feature_layer, bool) or not isinstance(self.feature_layer, numbers.Integral):
                raise TypeError(f"feature_layer must be an integer layer index or None, got {self.feature_layer!r}")
            object.__setattr__(self, "feature_layer", int(self.feature_layer))
        if self.merge not in MERGE_MODES:
            raise ValueError(f"merge must be one of {MERGE_MODES}, got {self.merge!r}")
        object.__setattr__(self, "seed", check_int("seed", self.seed, 0))
        if self.budget_scope not in BUDGET_SCOPES:
            raise ValueError(f"budget_scope must be one of {BUDGET_SCOPES}, got {self.budget_scope!r}")
        if self.temporal_threshold is not None:
            threshold = check_fraction("temporal_threshold", self.temporal_threshold)
            object.__setattr__(self, "temporal_threshold", threshold)
        if self.positions not in POSITION_SCHEMES:
            raise ValueError(f"positions must be one of {POSITION_SCHEMES}, got {self.positions!r}")
        if self.attention_mass is not None:
            object.__setattr__(self, "attention_mass", check_fraction("attention_mass", self.attention_mass))
        object.__setattr__(self, "min_dominant", check_int("min_dominant", self.min_dominant, 1))
        if self.max_dominant is not None:
            maximum = check_int("max_dominant", self.max_dominant, self.min_dominant)
            object.__setattr__(self, "max_dominant", maximum)
        if self.attention_mass is not None and self.temporal_threshold is not None:
            raise ValueError(
                "attention_mass (adaptive budget) and temporal_threshold cannot be combined; set one of them to None"
            )
        if self.attention_mass is not None and self.budget_scope != "per_crop":
            raise ValueError(
                "attention_mass (adaptive budget) chooses the budget of every crop / frame itself; it needs "
                f"budget_scope='per_crop', got {self.budget_scope!r}"
            )
        from vlmzip.methods import available_methods

        if self.method not in available_methods():
            raise ValueError(f"method must be one of {available_methods()}, got {self.method!r}")
        if self.attention_mass is not None and self.method in FIXED_COUNT_METHODS:
            raise ValueError(
                f"attention_mass (adaptive budget) does not apply to method {self.method!r}, whose token count must "
                "tile the patch grid; use a fixed budget or another method"
            )

    @property
    def tokens(self) -> int:
        """Visual tokens per image (or crop / frame) that reach the language model (fixed budget)."""
        return self.dominant + self.contextual

    @property
    def adaptive(self) -> bool:
        """Whether each image (crop, frame) chooses its dominant count (`attention_mass` is set)."""
        return self.attention_mass is not None

    @property
    def fewest_tokens(self) -> int:
        """The smallest budget any unit can get: `tokens`, or `min_dominant + contextual` when adaptive."""
        return self.min_dominant + self.contextual if self.adaptive else self.tokens

    @classmethod
    def from_tokens(cls, tokens: int, **kwargs: Any) -> VisionZipConfig:
        """Config for a total budget, split as the paper does (64 = 54 + 10, 128 = 108 + 20, 192 = 162 + 30)."""
        dominant, contextual = split_budget(tokens)
        return cls(dominant=dominant, contextual=contextual, **kwargs)

    @classmethod
    def from_budget(cls, budget: int | Sequence[int], **kwargs: Any) -> VisionZipConfig:
        """Config for a total budget (split as `from_tokens` does) or a (dominant, contextual) pair."""
        if isinstance(budget, (tuple, list)):
            if len(budget) != 2:
                raise ValueError(f"budget must be a token count or (dominant, contextual), got {budget!r}")
            return cls(dominant=budget[0], contextual=budget[1], **kwargs)
        return cls.from_tokens(budget, **kwargs)

    def per_unit(self, units: int) -> VisionZipConfig:
        """The config one crop (or frame) gets when an image (or video) is split into `units` of them.

        "per_crop": unchanged. "per_image": `dominant // units` and `contextual // units` per crop, so
        that every crop is reduced alike and the image gets `units * (dominant // units + contextual // units)`
        tokens, at most `dominant + contextual` (short by less than `units` per part). An image with 3
        crops under a 540 + 100 budget gets 180 + 33 per crop (639 tokens); with 5 crops, 108 + 20 (640).
        Raises when there are more units than dominant tokens (each crop needs one).
        """
        units = check_int("units", units, 1)
        if self.budget_scope == "per_crop":
            return self
        if self.dominant < units:
            raise ValueError(
                f"dominant must be >= the number of crops / frames ({units}) with budget_scope='per_image', "
                f"got {self.dominant}; raise dominant or use budget_scope='per_crop'"
            )
        return self.replace(
            dominant=self.dominant // units, contextual=self.contextual // units, budget_scope="per_crop"
        )

    def replace(self, **changes: Any) -> VisionZipConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VisionZipConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown VisionZipConfig fields {unknown}; known fields: {sorted(known)}")
        return cls(**data)
