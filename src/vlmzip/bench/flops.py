"""Analytical FLOPs of what actually ran: counted from the shapes each layer received.

Hooks on the vision tower's encoder layers, the projector, the language model's decoder layers and
the output head record the token counts of every call; FLOPs follow from the layers' linear weights
(2 per multiply-add) plus attention's score and value products. So skipped tower layers, reduced
sequences and FastV's shorter late layers are all counted as they ran. Selection, norms,
activations, embeddings and softmax are left out (well under 1 % for these models).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


def linear_weights(module: nn.Module) -> int:
    """Multiply-adds per token of every nn.Linear inside `module`."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


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
    call in the run is the prefill; projector and head (the output layer) are optional.
    """

    def __init__(
        self,
        tower_layers: nn.ModuleList,
        decoder_layers: nn.ModuleList,
        projector: nn.Module | None = None,
        head: nn.Module | None = None,
    ) -> None:
        self.tower_layers = tower_layers
        self.decoder_layers = decoder_layers
        self.projector = projector
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
            if isinstance(q_proj, nn.Linear):
                return q_proj.out_features
            fused = getattr(module, "qkv", None)
            if isinstance(fused, nn.Linear):
                return fused.out_features // 3
        return 0

    def _on_tower_layer(self, layer: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = _hidden_of(args, kwargs)
        if hidden is not None:
            sequences, tokens = hidden.shape[0], hidden.shape[1]
            width = self._tower_width[id(layer)]
            # Bidirectional: every query meets every key, once for scores and once for values.
            self.count.tower += sequences * (2 * tokens * self._weights[id(layer)] + 4 * tokens * tokens * width)

    def _on_projector(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = _hidden_of(args, kwargs)
        if hidden is not None:
            self.count.tower += 2 * (hidden.numel() // hidden.shape[-1]) * linear_weights(module)

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
        if self.projector is not None:
            self._handles.append(register(self.projector, self._on_projector))
        if self.head is not None:
            self._handles.append(register(self.head, self._on_head))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
