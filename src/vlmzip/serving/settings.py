"""What the vLLM plugin serves and with which budget, decided from a model directory and its HF config.

Kept free of vLLM imports so that `vlmzip export` and its checks run without vLLM installed.

The budget comes from `visionzip_config.json` in the model directory (the file `vlmzip export`
and `vlmzip finetune` write: `VisionZipConfig.to_dict()`), with the fields of the HF config's
`visionzip` attribute on top. vLLM sets that attribute from `--hf-overrides`:

    vllm serve OUT --hf-overrides '{"visionzip": {"dominant": 108, "contextual": 20}}'

Every `VisionZipConfig` field is accepted and validated as the library validates it. Two are refused by
`check_servable` because the plugin's model runner does not implement them: `positions="original"`
(vLLM numbers the reduced placeholders consecutively, i.e. "compact") and an adaptive budget
(`attention_mass`: the processor must know each image's token count before the tower runs).

    vllm serve OUT --hf-overrides '{"visionzip": {"retention": 0.25}}'

`retention` (in (0, 1]) replaces the fixed count by a share of each image's (or video frame's)
merged tokens, `max(1, round(retention * tokens))`, split into dominant and contextual as
`VisionZipConfig.from_tokens` does; it suits Qwen, whose images differ in size.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vlmzip.api import SAVED_CONFIG_NAME as CONFIG_FILENAME
from vlmzip.api import load_saved_config
from vlmzip.config import VisionZipConfig, check_fraction, split_budget

ARCHITECTURE = "VisionZipLlavaForConditionalGeneration"  # the name vLLM's registry knows the plugin by
QWEN2_5_VL_ARCHITECTURE = "VisionZipQwen2_5_VLForConditionalGeneration"
QWEN3_VL_ARCHITECTURE = "VisionZipQwen3VLForConditionalGeneration"
OVERRIDES_KEY = "visionzip"  # --hf-overrides '{"visionzip": {...}}' sets hf_config.visionzip
RETENTION_KEY = "retention"  # {"visionzip": {"retention": 0.25}}: a share of each image's tokens
# HF architectures the plugin can serve -> their model_type.
SERVABLE_ARCHITECTURES: dict[str, str] = {
    "LlavaForConditionalGeneration": "llava",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "Qwen3VLForConditionalGeneration": "qwen3_vl",
}
# Variable-resolution families (M-RoPE, merge units): model_type -> the family's name in messages.
QWEN_FAMILIES: dict[str, str] = {"qwen2_5_vl": "Qwen2.5-VL", "qwen3_vl": "Qwen3-VL"}
# model_type -> the plugin architecture that serves it (module:class registered with vLLM).
PLUGIN_ARCHITECTURES: dict[str, str] = {
    "llava": ARCHITECTURE,
    "qwen2_5_vl": QWEN2_5_VL_ARCHITECTURE,
    "qwen3_vl": QWEN3_VL_ARCHITECTURE,
}
PLUGIN_MODULES: dict[str, str] = {
    ARCHITECTURE: "vlmzip.serving.vllm",
    QWEN2_5_VL_ARCHITECTURE: "vlmzip.serving.qwen",
    QWEN3_VL_ARCHITECTURE: "vlmzip.serving.qwen3",
}
# LLaVA's tower configs the plugin's LLaVA class builds (vLLM's CLIP; transformers' DINOv2).
SERVABLE_TOWERS: tuple[str, ...] = ("clip_vision_model", "dinov2")


@dataclass(frozen=True)
class ServingBudget:
    """A served model's budget: a fixed `config`, or `retention` of each image's merged tokens.

    For models of variable resolution (Qwen), an image or video frame whose merged token count is
    no more than its budget is sent whole; `item_tokens` is what vLLM schedules for it.
    """

    config: VisionZipConfig
    retention: float | None = None

    def frame_config(self, units: int, frames: int = 1) -> VisionZipConfig | None:
        """The config one image (or one of a video's `frames` temporal slices) of `units` tokens gets.

        None when it is sent whole (the budget is not smaller than its token count).
        """
        if self.retention is not None:
            dominant, contextual = split_budget(max(1, round(self.retention * units)))
            config = self.config.replace(dominant=dominant, contextual=contextual, budget_scope="per_crop")
        else:
            config = self.config.per_unit(frames)
        return None if config.tokens >= units else config

    def item_tokens(self, units: int, frames: int = 1) -> int:
        """Placeholder tokens of an image (frames=1) or a video of `frames` slices of `units` tokens each."""
        config = self.frame_config(units, frames)
        return frames * (units if config is None else config.tokens)


def _overrides(hf_config: Any) -> dict[str, Any] | None:
    overrides = getattr(hf_config, OVERRIDES_KEY, None)
    if overrides is None:
        return None
    if not isinstance(overrides, Mapping):
        raise TypeError(
            f"hf_overrides {OVERRIDES_KEY!r} must be an object of VisionZipConfig fields, e.g. "
            f'{{"{OVERRIDES_KEY}": {{"dominant": 54, "contextual": 10}}}}, got {overrides!r}'
        )
    return dict(overrides)


def resolve_budget(model_dir: str | os.PathLike[str], hf_config: Any) -> ServingBudget:
    """The budget to serve `model_dir` with: its visionzip_config.json, then the hf_overrides on top.

    Raises ValueError when neither exists, when a field is unknown or invalid, or when the model
    cannot be served with this budget (see `check_servable`).
    """
    overrides = _overrides(hf_config)
    retention = None
    if overrides is not None and RETENTION_KEY in overrides:
        clash = sorted({"dominant", "contextual"} & set(overrides))
        if clash:
            raise ValueError(
                f"{model_dir}: hf_overrides {OVERRIDES_KEY!r} gives both {RETENTION_KEY!r} and {clash}: "
                f"pass either a share of each image's tokens or a fixed count"
            )
        try:
            retention = check_fraction(RETENTION_KEY, overrides.pop(RETENTION_KEY))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{model_dir}: invalid VisionZip serving config: {error}") from None
    config = _resolve_fixed(model_dir, overrides, need_budget=retention is None)
    check_servable(hf_config, config)
    if retention is not None and check_architecture(hf_config) == "LlavaForConditionalGeneration":
        # LLaVA-1.5's images all yield the same count: the share is one fixed budget.
        dominant, contextual = split_budget(max(1, round(retention * tower_tokens(hf_config))))
        config = config.replace(dominant=dominant, contextual=contextual)
        retention = None
        check_servable(hf_config, config)
    return ServingBudget(config, retention)


def resolve_config(model_dir: str | os.PathLike[str], hf_config: Any) -> VisionZipConfig:
    """The fixed budget of a LLaVA-1.5 model (see `resolve_budget`)."""
    return resolve_budget(model_dir, hf_config).config


def _resolve_fixed(
    model_dir: str | os.PathLike[str], overrides: dict[str, Any] | None, *, need_budget: bool
) -> VisionZipConfig:
    stored = load_saved_config(model_dir)
    if stored is None and overrides is None and not need_budget:
        overrides = {}
    if stored is None and overrides is None:
        raise ValueError(
            f"{model_dir}: no {CONFIG_FILENAME}; create the directory with `vlmzip export --model DIR -o OUT "
            f'--dominant D --contextual C` or pass --hf-overrides \'{{"{OVERRIDES_KEY}": {{"dominant": D, '
            f'"contextual": C}}}}\''
        )
    try:
        config = VisionZipConfig.from_dict({**(stored.to_dict() if stored else {}), **(overrides or {})})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{model_dir}: invalid VisionZip serving config: {error}") from None
    return config


def check_architecture(hf_config: Any) -> str:
    """The servable HF architecture `hf_config` is, or ValueError naming the supported ones."""
    model_type = getattr(hf_config, "model_type", None)
    for architecture, expected_type in SERVABLE_ARCHITECTURES.items():
        if model_type == expected_type:
            return architecture
    raise ValueError(
        f"unsupported architecture: model_type {model_type!r} "
        f"(architectures {getattr(hf_config, 'architectures', None)}); VisionZip serving supports "
        f"{sorted(SERVABLE_ARCHITECTURES)} (LLaVA with a CLIP or DINOv2 vision tower)"
    )


def tower_tokens(hf_config: Any) -> int:
    """Tokens the vision tower yields per image ([CLS] included) at the model's resolution.

    DINOv2 interpolates its position embeddings to the processor's crop, which may differ from its
    `image_size` (the embedded model: 336 px crops, 577 tokens, on a 518 px tower): the LLaVA
    config's `image_seq_length` (placeholders per image) gives the count there.
    """
    vision = hf_config.vision_config
    if getattr(vision, "model_type", None) == "dinov2" and getattr(hf_config, "image_seq_length", None):
        full = getattr(hf_config, "vision_feature_select_strategy", "default") == "full"
        return int(hf_config.image_seq_length) + (0 if full else 1)
    side = int(vision.image_size) // int(vision.patch_size)
    return side * side + 1


def absolute_feature_layer(hf_config: Any, config: VisionZipConfig) -> int:
    """The 1-based index of the tower layer whose output is the feature (hidden_states[k], k >= 1).

    vLLM builds the tower only up to the model's `vision_feature_layer`, so negative indices are
    resolved against the full tower's depth here; VisionZip may read that layer or an earlier one.
    """
    num_layers = int(hf_config.vision_config.num_hidden_layers)
    model_layer = getattr(hf_config, "vision_feature_layer", -2)
    if isinstance(model_layer, bool) or not isinstance(model_layer, int):
        raise ValueError(
            f"vision_feature_layer={model_layer!r}: VisionZip serving needs one feature layer (an int), "
            "not a list of layers"
        )
    requested = model_layer if config.feature_layer is None else config.feature_layer
    built = model_layer % (num_layers + 1)
    if not (-num_layers <= requested <= -1 or 1 <= requested <= num_layers) or requested % (num_layers + 1) > built:
        raise ValueError(
            f"feature_layer must be in [-{num_layers}, -1] or [1, {num_layers}] and no deeper than the model's "
            f"vision_feature_layer ({model_layer}) for this {num_layers}-layer tower, got {requested}"
        )
    return requested % (num_layers + 1)


def check_servable(hf_config: Any, config: VisionZipConfig) -> int:
    """Raise ValueError unless the plugin can serve `hf_config` with `config`; return tokens per image.

    For Qwen2.5-VL and Qwen3-VL (variable resolution) the count is per image at most: smaller images
    are sent whole.
    """
    check_architecture(hf_config)
    if hf_config.model_type in QWEN_FAMILIES:
        return _check_qwen(QWEN_FAMILIES[hf_config.model_type], config)
    vision = getattr(hf_config, "vision_config", None)
    tower = getattr(vision, "model_type", None)
    if tower not in SERVABLE_TOWERS:
        raise ValueError(f"unsupported vision tower {tower!r}; VisionZip serving supports {list(SERVABLE_TOWERS)}")
    absolute_feature_layer(hf_config, config)
    if config.positions != "compact":
        raise ValueError(
            f"positions={config.positions!r} is not available in vLLM serving: the engine numbers the reduced "
            "image tokens consecutively; serve with positions='compact' (or use transformers for original positions)"
        )
    if config.attention_mass is not None:
        raise ValueError(
            "attention_mass (adaptive budget) is not available in vLLM serving: the processor must know each "
            "image's token count before the tower runs; serve a fixed dominant + contextual budget"
        )
    available = tower_tokens(hf_config)
    if config.tokens > available:
        raise ValueError(
            f"dominant + contextual must be <= {available} (the tokens this model's tower yields per image), "
            f"got {config.dominant} + {config.contextual} = {config.tokens}"
        )
    return config.tokens


def check_overrides_target(model: str | os.PathLike[str] | None, hf_overrides: Any) -> None:
    """Refuse a VisionZip budget in `hf_overrides` for a model the plugin does not serve.

    vLLM sets any --hf-overrides key on the HF config; only the plugin's architecture reads
    'visionzip', so on any other (e.g. a `vlmzip export --plain` directory) the budget would be
    ignored and every visual token served. Models whose config.json is not local get a warning.
    """
    import json
    import warnings
    from pathlib import Path

    if isinstance(hf_overrides, str):
        try:
            hf_overrides = json.loads(hf_overrides)
        except ValueError:
            return  # vLLM reports malformed JSON itself
    if not isinstance(hf_overrides, Mapping) or OVERRIDES_KEY not in hf_overrides or model is None:
        return
    architectures = hf_overrides.get("architectures")
    config_file = Path(model) / "config.json"
    if architectures is None and config_file.is_file():
        try:
            architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures")
        except (ValueError, AttributeError):
            architectures = None
    if architectures is None:
        warnings.warn(
            f"--hf-overrides sets {OVERRIDES_KEY!r} but the architecture of {model} is not known here: the budget "
            f"applies only if it is one of {sorted(PLUGIN_MODULES)} (a `vlmzip export` directory); otherwise "
            "every visual token is served",
            stacklevel=2,
        )
        return
    if not set(architectures) & set(PLUGIN_MODULES):
        raise ValueError(
            f"--hf-overrides sets {OVERRIDES_KEY!r}, but {model} is {list(architectures)}, which the VisionZip "
            f"plugin does not serve: the budget would be ignored and every visual token served. Serve a directory "
            f"written by `vlmzip export` (without --plain), or leave {OVERRIDES_KEY!r} out of --hf-overrides"
        )


def requested_from_argv(argv: list[str]) -> tuple[str | None, str | None]:
    """(model, --hf-overrides value) of a `vllm serve MODEL ...` command line; (None, None) for others."""
    if "serve" not in argv:
        return None, None
    rest = argv[argv.index("serve") + 1 :]
    model = rest[0] if rest and not rest[0].startswith("-") else None
    overrides = None
    for index, item in enumerate(rest):
        name, equals, value = item.partition("=")
        if name in ("--model", "--hf-overrides", "--hf_overrides"):
            value = value if equals else (rest[index + 1] if index + 1 < len(rest) else None)
            if name == "--model":
                model = value
            else:
                overrides = value
    return model, overrides


def _check_qwen(family: str, config: VisionZipConfig) -> int:
    if config.feature_layer not in (None, -1):
        raise ValueError(
            f"feature_layer: {family}'s visual tokens are the merger output of the tower's final block; "
            f"leave feature_layer unset (or -1), got {config.feature_layer}"
        )
    if config.temporal_threshold is not None:
        raise ValueError(
            "temporal_threshold is not supported when serving: vLLM must know each video's token count "
            f"before the encoder runs, got {config.temporal_threshold}"
        )
    return config.tokens
