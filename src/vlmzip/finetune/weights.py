"""The projector's parameters: finding the projector, naming its weights in the whole model, copying weights in."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn


def projector_of(adapter: Any) -> nn.Module:
    get = getattr(adapter, "projector", None)
    if get is None:
        name = type(adapter.model).__name__
        raise ValueError(f"model: projector fine-tuning is not available for {name} (its adapter has no projector)")
    return get()


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The parameters that require grad, under the model's own state-dict names, on CPU."""
    return {name: p.detach().cpu().contiguous() for name, p in model.named_parameters() if p.requires_grad}


def projector_names(model: nn.Module, projector: nn.Module) -> dict[str, str]:
    """Projector parameter name -> the same parameter's name in the whole model."""
    by_id = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    return {name: by_id[id(p)] for name, p in projector.named_parameters()}


def load_into(model: nn.Module, state: dict[str, torch.Tensor], expected: Sequence[str], source: Path) -> None:
    """Copy `state` into the model's parameters named `expected` (exactly those), checking shapes."""
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{source}: projector weights do not match this model (missing {missing}, unexpected {unexpected})"
        )
    parameters = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name in expected:
            target = parameters[name]
            if tuple(state[name].shape) != tuple(target.shape):
                raise ValueError(
                    f"{source}: {name} has shape {tuple(state[name].shape)}, the model needs {tuple(target.shape)}"
                )
            target.copy_(state[name].to(device=target.device, dtype=target.dtype))
