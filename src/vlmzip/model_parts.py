"""Where a vision-language model keeps its parts, across families."""

from __future__ import annotations

from torch import nn

# Attribute of the inner model (`model.model`) that holds the decoder, by family convention.
LANGUAGE_MODEL_ATTRIBUTES = ("language_model", "text_model")  # most families; SmolVLM


def language_model_of(model: nn.Module) -> nn.Module:
    """The decoder of a vision-language model (`model.model.language_model`, SmolVLM's `text_model`).

    Raises ValueError naming the model when it has none with a `layers` list.
    """
    inner = getattr(model, "model", None)
    for name in LANGUAGE_MODEL_ATTRIBUTES:
        decoder = getattr(inner, name, None)
        if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
            return decoder
    raise ValueError(
        f"model: expected a vision-language model with model.model.language_model.layers (or text_model.layers), "
        f"got {type(model).__name__}"
    )


__all__ = ["language_model_of"]
