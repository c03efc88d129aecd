"""The public entry points: compress_vision, apply, prepare, remove."""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmzip.adapters import adapter_class_for, check_supported
from vlmzip.adapters.base import _APPLIED, Adapter, PaddingSide, model_directory
from vlmzip.cache import ImageCache, check_cache
from vlmzip.config import VisionZipConfig
from vlmzip.core import Reduction
from vlmzip.methods import get_method
from vlmzip.probe import check_pixel_values, probe_vision_tower, resolve_tower

STATE_ATTRIBUTE = "_visionzip_state"
_MISSING = object()
# Instance attributes apply() overrides; remove() puts back exactly what was there before.
_WRAPPED_METHODS = ("forward", "generate")
# Written beside a model whose projector was fine-tuned on reduced tokens: the budget it was tuned for.
SAVED_CONFIG_NAME = "visionzip_config.json"


def compress_vision(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    dominant: int = 54,
    contextual: int = 10,
    *,
    feature_layer: int = -2,
    merge: str = "target_plus_mean",
    method: str = "visionzip",
    seed: int = 0,
    **tower_kwargs: Any,
) -> Reduction:
    """Reduce a vision tower's output to `dominant + contextual` tokens per image.

    Runs `vision_model` only up to `feature_layer` (default -2, LLaVA's), on whatever attention
    backend it uses. Returns a `Reduction` with `.features` (B, dominant + contextual, hidden),
    the feature layer's tokens before any projector, and `.kept_indices` (B, dominant), ascending,
    0 being [CLS] on towers that have one.
    """
    config = VisionZipConfig(
        dominant=dominant, contextual=contextual, feature_layer=feature_layer, merge=merge, method=method, seed=seed
    )
    tower = resolve_tower(vision_model)
    tower.feature_layer_index(feature_layer)
    pixel_values = check_pixel_values(pixel_values, tower)
    num_tokens = tower.num_tokens(*pixel_values.shape[-2:])
    if config.tokens > num_tokens:
        raise ValueError(
            f"dominant + contextual must be <= {num_tokens} (the tokens this tower yields for "
            f"{tuple(pixel_values.shape[-2:])} images), got {dominant} + {contextual} = {config.tokens}"
        )
    probe = probe_vision_tower(vision_model, pixel_values, feature_layer, **tower_kwargs)
    return get_method(config.method)(probe, config)


@dataclass
class VisionZipState:
    """Everything apply() put on a model instance, so that remove() can take it all back."""

    adapter: Adapter
    config: VisionZipConfig
    cache: ImageCache | None = None
    previous: dict[str, Any] = field(default_factory=dict)


def get_state(model: nn.Module) -> VisionZipState | None:
    return model.__dict__.get(STATE_ATTRIBUTE)


def is_applied(model: nn.Module) -> bool:
    return get_state(model) is not None


def apply(
    model: nn.Module,
    config: VisionZipConfig | None = None,
    *,
    processor: Any = None,
    cache: ImageCache | None = None,
    **config_fields: Any,
) -> nn.Module:
    """Make `model` send `dominant + contextual` visual tokens per image to its language model.

    `apply(model, VisionZipConfig(dominant=54, contextual=10))` or `apply(model, dominant=54, contextual=10)`.
    `cache`: an optional `vlmzip.ImageCache`; images found in it skip the vision tower and the
    selection (their reduced, projected tokens are reused), the others are stored in it.
    State lives on this instance only (no class or global patch); `remove(model)` undoes it.
    With no config and no fields, a model loaded from a directory holding `visionzip_config.json`
    (written by `vlmzip finetune`) gets the budget it was fine-tuned for; others get the defaults.
    Applying to a model that already has VisionZip raises: call `remove(model)` first.
    A budget that can never fit is refused here: the limit is the tower's token count at the input
    size of `processor` (the model's processor, optional), else of the processor saved in the
    directory the model was loaded from, else of the tower config's `image_size`.
    After apply, `model.generate(**inputs)` and `model(**inputs)` prepare raw processor inputs
    themselves; `prepare(model, inputs)` does the same explicitly. `model.generate(**inputs)` then
    returns `inputs["input_ids"]` followed by the new tokens (as without VisionZip), while
    `model.generate(**prepare(model, inputs))` returns the reduced prompt followed by the new tokens.
    Returns `model`.
    """
    check_cache(cache)
    if config is not None and config_fields:
        raise TypeError("apply() takes either a VisionZipConfig or config fields as keywords, not both")
    if config is None:
        config = VisionZipConfig(**config_fields) if config_fields else saved_config(model) or VisionZipConfig()
    if not isinstance(config, VisionZipConfig):
        raise TypeError(f"config must be a VisionZipConfig, got {type(config).__name__}")
    adapter_class = adapter_class_for(model)
    if is_applied(model):
        raise ValueError("model already has VisionZip applied; call vlmzip.remove(model) before applying again")
    adapter = adapter_class(model, config, processor)  # validates everything before the model is touched

    adapter.cache = cache
    state = VisionZipState(adapter=adapter, config=config, cache=cache)
    for name in _WRAPPED_METHODS:
        state.previous[name] = model.__dict__.get(name, _MISSING)
    model.forward = _auto_prepare(model, model.forward, adapter)
    model.generate = _auto_prepare(model, model.generate, adapter, restore_prompt=True)
    model.__dict__[STATE_ATTRIBUTE] = state
    return model


def load_saved_config(directory: str | Path) -> VisionZipConfig | None:
    """The VisionZipConfig saved in `directory` (`visionzip_config.json`), or None when there is none."""
    path = Path(directory) / SAVED_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        return VisionZipConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, AttributeError) as error:
        raise ValueError(f"{path}: not a valid VisionZip config ({error})") from None


def saved_config(model: nn.Module) -> VisionZipConfig | None:
    """The config saved in the directory `model` was loaded from (`name_or_path`), if any."""
    directory = model_directory(model)
    return load_saved_config(directory) if directory is not None else None


def _auto_prepare(
    model: nn.Module, method: Callable[..., Any], adapter: Adapter, *, restore_prompt: bool = False
) -> Callable[..., Any]:
    """Wrap a bound method so that raw image inputs are prepared before it runs.

    restore_prompt (generate): the returned sequences start with the caller's own `input_ids`
    (not the reduced prompt the model actually read), so `out[:, inputs["input_ids"].shape[1]:]`
    is the new tokens, as without VisionZip.
    """
    signature = inspect.signature(method)

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if args:
            bound = signature.bind_partial(*args, **kwargs)
            kwargs = dict(bound.arguments)
            kwargs.update(kwargs.pop("kwargs", None) or {})
        if not any(kwargs.get(key) is not None for key in adapter.image_input_keys):
            return method(**kwargs)
        caller_ids = kwargs.get("input_ids")
        kwargs = adapter.prepare(kwargs)
        output = method(**kwargs)
        if restore_prompt and isinstance(caller_ids, torch.Tensor):
            output = with_caller_prompt(output, caller_ids, kwargs["input_ids"].shape[1])
        return output

    return wrapper


def with_caller_prompt(output: Any, caller_ids: torch.Tensor, reduced_length: int) -> Any:
    """generate()'s output with the reduced prompt (first `reduced_length` columns) replaced by `caller_ids`.

    Rows of a beam search or of `num_return_sequences > 1` follow their sample (`repeat_interleave`,
    as generate expands its inputs). Works on a tensor and on a `GenerateOutput` (its `sequences`).
    """
    sequences = output if isinstance(output, torch.Tensor) else getattr(output, "sequences", None)
    if not isinstance(sequences, torch.Tensor) or sequences.ndim != 2 or caller_ids.ndim != 2:
        return output
    rows, batch = sequences.shape[0], caller_ids.shape[0]
    if batch == 0 or rows % batch or sequences.shape[1] < reduced_length:
        return output
    prompt = caller_ids.to(device=sequences.device, dtype=sequences.dtype).repeat_interleave(rows // batch, dim=0)
    restored = torch.cat([prompt, sequences[:, reduced_length:]], dim=1)
    if isinstance(output, torch.Tensor):
        return restored
    output.sequences = restored
    return output


def prepare(
    model: nn.Module,
    inputs: Mapping[str, Any],
    *,
    padding_side: PaddingSide | None = None,
    cache: ImageCache | None | object = _APPLIED,
) -> dict[str, Any]:
    """Turn a processor's output into inputs that carry `dominant + contextual` tokens per image.

    Runs the vision tower once, reduces, projects, shrinks each image's placeholder run in
    `input_ids` (and `attention_mask`, `labels`, `token_type_ids`, ...), re-pads the batch (left
    unless the input was right-padded, or as `padding_side` says) and returns a dict for
    `model.generate(**...)` or `model(**...)`. Text-only inputs come back unchanged.
    Images found in the cache given to `apply` are not encoded again; `cache` (an ImageCache, or
    None for none) overrides that cache for this call.
    `model.generate(**prepared)` returns the reduced prompt followed by the new tokens: slice the
    answer with `out[:, prepared["input_ids"].shape[1]:]`.
    """
    state = get_state(model)
    if state is None:
        check_supported(model)  # unsupported families get that error first
        raise ValueError("model has no VisionZip applied; call vlmzip.apply(model, config) first")
    if cache is not _APPLIED:
        check_cache(cache)
    return state.adapter.prepare(inputs, padding_side=padding_side, cache=cache)


def remove(model: nn.Module) -> nn.Module:
    """Undo `apply(model, ...)`: the model behaves exactly as before. Returns `model`."""
    state = get_state(model)
    if state is None:
        raise ValueError("model has no VisionZip applied; nothing to remove")
    for name, previous in state.previous.items():
        if previous is _MISSING:
            model.__dict__.pop(name, None)
        else:
            model.__dict__[name] = previous
    state.adapter.cache = None  # the cache is detached: nothing that kept the adapter can still fill it
    del model.__dict__[STATE_ATTRIBUTE]
    return model
