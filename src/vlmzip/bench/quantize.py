"""`--quantize int8` of `bench` and `eval`: int8 weights for the language model only.

The scheme is PyTorch's own dynamic quantization (`torch.ao.quantization.quantize_dynamic`):
every `nn.Linear` of the language model and its output head stores int8 weights (one scale per
output channel) and quantizes its input to int8 per call, so the matrix products run on int8
kernels (fbgemm). The vision tower and projector keep the model's dtype, so VisionZip's selection
is unchanged and the reduced visual tokens are the same.

Why this one: it ships with torch (no extra dependency), runs on any x86 CPU, and was the fastest
int8 path measured on this project's CPUs (see docs/cache-and-quantization.md); torchao 0.18's
`Int8WeightOnlyConfig` and `Int8DynamicActivationInt8WeightConfig` also load with torch 2.13 but ran
slower than bfloat16 there. The int8 kernels take float32 inputs: the quantized language model
computes its activations (and its KV cache) in float32, so its non-linear parameters (embeddings,
norms) are converted to float32 too; they are a small share of the weights. CPU only.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

QUANTIZE_SCHEMES = ("none", "int8")


def language_model_parts(model: nn.Module) -> list[nn.Module]:
    """The language model and its output head: what `--quantize` converts."""
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    if not isinstance(language_model, nn.Module):
        raise ValueError(f"model: {type(model).__name__} has no model.language_model to quantize")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [language_model, *([head] if isinstance(head, nn.Module) else [])]


def quantize_language_model(model: nn.Module, scheme: str = "int8") -> nn.Module:
    """Quantize `model`'s language model in place with `scheme` ("none" or "int8"); returns `model`.

    Works module by module (one decoder layer is converted to float32 at a time), so the peak stays
    close to the quantized size. Raises on CUDA models: the int8 kernels are CPU kernels.
    """
    if scheme not in QUANTIZE_SCHEMES:
        raise ValueError(f"quantize must be one of {QUANTIZE_SCHEMES}, got {scheme!r}")
    if scheme == "none":
        return model
    language_model = language_model_parts(model)[0]
    device = next(language_model.parameters()).device
    if device.type != "cpu":
        raise ValueError(f"quantize='int8' runs on CPU only (PyTorch's dynamic int8 kernels); the model is on {device}")
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    spec = {nn.Linear: per_channel_dynamic_qconfig}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        for child in _units(language_model):
            child.float()
            quantize_dynamic(child, spec, dtype=torch.qint8, inplace=True)
        language_model.float()  # what is left: embeddings, norms, rotary buffers
    if hasattr(model, "get_output_embeddings") and isinstance(model.get_output_embeddings(), nn.Linear):
        head = model.get_output_embeddings()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            quantized = quantize_dynamic(nn.Sequential(head.float()), spec, dtype=torch.qint8)[0]
        model.set_output_embeddings(quantized)
    return model


def _units(part: nn.Module) -> list[nn.Module]:
    """Children small enough to convert one at a time (the decoder layers), or the part itself."""
    layers = getattr(part, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers):
        return list(layers)
    return [part]


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights, int8 packed weights included (for reporting)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    total += sum(b.numel() * b.element_size() for b in model.buffers())
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    for module in model.modules():
        if isinstance(module, DynamicLinear):
            bias = module.bias()
            total += module.weight().numel() + (bias.numel() * bias.element_size() if bias is not None else 0)
    return total


__all__ = ["QUANTIZE_SCHEMES", "language_model_parts", "quantize_language_model", "quantized_bytes"]
