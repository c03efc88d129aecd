"""Analytical FLOPs of what actually ran: counted from the shapes each layer received.

Hooks on the vision tower's encoder layers, the projector, the language model's decoder layers and
the output head record the token counts of every call; FLOPs follow from the layers' linear weights
(2 per multiply-add) plus attention's score and value products. So skipped tower layers, reduced
sequences and FastV's shorter late layers are all counted as they ran. Selection, norms,
activations, embeddings and softmax are left out (well under 1 % for these models).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or its int8 replacement (`bench --quantize int8`: torch.ao's dynamic quantized Linear)."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return isinstance(module, (nn.Linear, DynamicLinear))


def _weight_count(module: nn.Module) -> int:
    weight = module.weight
    return (weight() if callable(weight) else weight).numel()


def linear_weights(module: nn.Module) -> int:
    """Multiply-adds per token of every linear layer (float or int8) inside `module`."""
    return sum(_weight_count(m) for m in module.modules() if _is_linear(m))


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor | None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    return hidden if isinstance(hidden, torch.Tensor) else None


@dataclass
class FlopCount:
    tower: float = 0.0  # encoder layers that ran + projector
    llm_prefill: float = 0.0  # decoder layers + output head, first forward of the language model only
    llm_layer_lengths: list[int] = field(default_factory=list)  # sequence length each decoder layer saw in prefill

    @property
    def tower_gflops(self) -> float:
        return self.tower / 1e9

    @property
    def llm_prefill_gflops(self) -> float:
        return self.llm_prefill / 1e9


class FlopCounter:
    """Context manager counting the FLOPs of one pipeline run (tower, projector, language-model prefill).

    tower_layers: the vision encoder's layers; decoder_layers: the language model's layers, whose first
    call in the run is the prefill; projector (one module or several, e.g. Qwen's merger and deepstack
    mergers) and head (the output layer) are optional. Tower layers may take (sequences, tokens, hidden)
    or packed (tokens, hidden) with `cu_seqlens` segment bounds (Qwen): attention is counted per segment.
    """

    def __init__(
        self,
        tower_layers: nn.ModuleList,
        decoder_layers: nn.ModuleList,
        projector: nn.Module | Sequence[nn.Module] | None = None,
        head: nn.Module | None = None,
    ) -> None:
        self.tower_layers = tower_layers
        self.decoder_layers = decoder_layers
        if projector is None:
            projector = []
        self.projectors = [projector] if isinstance(projector, nn.Module) else list(projector)
        self.head = head
        self.count = FlopCount()
        self._handles: list[Any] = []
        self._seen: set[int] = set()
        self._head_seen = False
        self._weights = {id(layer): linear_weights(layer) for layer in [*tower_layers, *decoder_layers]}
        self._tower_width = {id(layer): self._attention_width(layer) for layer in tower_layers}
        self._decoder_width = {id(layer): self._attention_width(layer) for layer in decoder_layers}

    @staticmethod
    def _attention_width(layer: nn.Module) -> int:
        """Width of the query (heads x head_dim): the inner dimension of the score and value products."""
        for module in layer.modules():
            q_proj = getattr(module, "q_proj", None) or getattr(module, "query", None)
            if q_proj is not None and _is_linear(q_proj):
                return q_proj.out_features
            fused = getattr(module, "qkv", None)
            if fused is not None and _is_linear(fused):
                return fused.out_features // 3
        return 0

    def _on_tower_layer(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = _hidden_of(args, kwargs)
        if hidden is None:
            return
        width = self._tower_width[id(layer)]
        if hidden.ndim == 2:  # packed (tokens, hidden), e.g. Qwen: attention runs within each cu_seqlens segment
            tokens = hidden.shape[0]
            pairs = tokens * tokens
            bounds = kwargs.get("cu_seqlens", args[1] if len(args) > 1 else None)
            if isinstance(bounds, torch.Tensor) and bounds.numel() > 1:
                pairs = int((bounds[1:] - bounds[:-1]).long().pow(2).sum())
            # Bidirectional: every query meets every key of its segment, once for scores and once for values.
            self.count.tower += 2 * tokens * self._weights[id(layer)] + 4 * pairs * width
            return
        sequences, tokens = hidden.shape[0], hidden.shape[1]
        self.count.tower += sequences * (2 * tokens * self._weights[id(layer)] + 4 * tokens * tokens * width)

    def _on_projector(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = _hidden_of(args, kwargs)
        if hidden is None:
            return
        # Rows the first linear layer sees: a merger that folds 2x2 patches into one row sees a quarter of them.
        first = next((m for m in module.modules() if isinstance(m, nn.Linear)), None)
        width = first.in_features if first is not None else hidden.shape[-1]
        self.count.tower += 2 * (hidden.numel() // width) * linear_weights(module)

    def _on_decoder_layer(self, layer: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # Read from the output, after any pre-hook (FastV) has shortened the sequence.
        if id(layer) in self._seen:  # decoding steps are not part of the prefill
            return
        self._seen.add(id(layer))
        hidden = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(hidden, torch.Tensor):
            return
        sequences, tokens = hidden.shape[0], hidden.shape[1]
        width = self._decoder_width[id(layer)]
        pairs = tokens * (tokens + 1) // 2  # causal
        self.count.llm_prefill += sequences * (2 * tokens * self._weights[id(layer)] + 4 * pairs * width)
        self.count.llm_layer_lengths.append(tokens)

    def _on_head(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._head_seen:
            return
        self._head_seen = True
        hidden = _hidden_of(args, kwargs)
        if hidden is not None:
            self.count.llm_prefill += 2 * (hidden.numel() // hidden.shape[-1]) * linear_weights(module)

    def __enter__(self) -> FlopCounter:
        self.count = FlopCount()
        self._seen, self._head_seen = set(), False
        register = lambda module, hook: module.register_forward_pre_hook(hook, with_kwargs=True)  # noqa: E731
        self._handles = [register(layer, self._on_tower_layer) for layer in self.tower_layers]
        self._handles += [
            layer.register_forward_hook(self._on_decoder_layer, with_kwargs=True) for layer in self.decoder_layers
        ]
        self._handles += [register(projector, self._on_projector) for projector in self.projectors]
        if self.head is not None:
            self._handles.append(register(self.head, self._on_head))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def projector_modules(model: nn.Module, tower: nn.Module) -> list[nn.Module]:
    """What maps tower features to the language model's width: LLaVA's `multi_modal_projector`,
    SmolVLM's `connector`, or the merger inside a Qwen tower plus Qwen3-VL's deepstack mergers."""
    modules = [getattr(model.model, name, None) for name in ("multi_modal_projector", "connector")]
    modules.append(getattr(tower, "merger", None))
    modules += list(getattr(tower, "deepstack_merger_list", None) or [])
    return [module for module in modules if isinstance(module, nn.Module)]
