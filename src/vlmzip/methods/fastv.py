"""FastV (Chen et al., ECCV 2024): text-aware pruning of visual tokens inside the language model.

FastV is not a pre-LLM method: it needs the prompt. The first `layer` (K, default 2) decoder layers
run on the full sequence; then the visual tokens are ranked by the attention the last prompt token
paid them in layer K - 1 (softmax row, averaged over heads) and all but the top ones are dropped
from the hidden states, positions and attention mask of layers K and up, and so from their KV cache.
Kept tokens keep their original positions, so decoding continues exactly where the full prompt ends.
Its cost is honest: the vision tower and the first K layers see every token.

    with FastV(model, tokens=64):              # 64 visual tokens per image after layer 2
        out = model.generate(**processor_outputs, max_new_tokens=16)

The pruning lives in forward hooks on the model instance, removed on exit. It supports decoder
stacks with standard rotary embeddings (Llama, Mistral, Qwen2), greedy/sampled/beam generation with
a dynamic cache (or none), left-padded batches whose samples hold the same number of image tokens,
and the last position of each prompt being a real token (left padding, as for generation).
Forward calls that need logits at every position (losses) are not supported while it is installed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from vlmzip._validation import check_int
from vlmzip.compat import passed_cache
from vlmzip.methods import INSIDE_LLM, register_method
from vlmzip.model_parts import language_model_of

FASTV_METHOD = "fastv"
DEFAULT_LAYER = 2


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _language_model(model: nn.Module) -> nn.Module:
    try:
        return language_model_of(model)
    except ValueError:
        raise ValueError(
            f"model: FastV needs a vision-language model with model.model.language_model.layers "
            f"(LLaVA-style), got {type(model).__name__}"
        ) from None


def _unsupported_layout(problem: str) -> ValueError:
    """A clear error where a transformers release lays out a decoder layer's arguments differently."""
    import transformers

    return ValueError(
        f"FastV cannot prune this model with transformers {transformers.__version__}: {problem}. "
        "FastV is tested with transformers 5.23 to 5.25; use one of those or another method"
    )


def _take_rows(values: torch.Tensor, keep: torch.Tensor, dim: int) -> torch.Tensor:
    """Gather the `keep` (B, L') positions of `values` along `dim` (values' batch dim 0 may be 1)."""
    values = values.expand(keep.shape[0], *values.shape[1:])
    index = keep.view(keep.shape[0], *([1] * (dim - 1)), keep.shape[1], *([1] * (values.ndim - dim - 1)))
    target = list(values.shape)
    target[dim] = keep.shape[1]
    return values.gather(dim, index.expand(*target))


@register_method(FASTV_METHOD, kind=INSIDE_LLM)
class FastV:
    """Install FastV pruning on a LLaVA-style model; use as a context manager or install()/remove().

    Args:
        model: e.g. `LlavaForConditionalGeneration` (anything with model.model.language_model.layers).
        tokens: visual tokens kept per image after layer `layer` (>= 1, <= image_tokens).
        layer: K, the number of decoder layers that see every token (>= 1, < number of layers).
        image_tokens: placeholder tokens per image in the prompt; default: the model config's
            `image_seq_length`. A sample keeps round(its image tokens * tokens / image_tokens) of them.
    """

    def __init__(self, model: nn.Module, tokens: int, *, layer: int = DEFAULT_LAYER, image_tokens: int | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a transformers model (nn.Module), got {type(model).__name__}")
        reason = self.unsupported_reason(model)
        if reason is not None:
            raise ValueError(reason)
        self.model = model
        self.language_model = _language_model(model)
        self.layers = self.language_model.layers
        self.layer = check_int("layer", layer, 1, len(self.layers) - 1)
        config = model.config
        token_id = getattr(config, "image_token_id", getattr(config, "image_token_index", None))
        if not isinstance(token_id, int):
            raise ValueError("model config has no image_token_id; FastV cannot find the image tokens")
        self.image_token_id = token_id
        if image_tokens is None:
            image_tokens = getattr(config, "image_seq_length", None)
            if image_tokens is None:
                raise ValueError("image_tokens must be given: the model config has no image_seq_length")
        self.image_tokens = check_int("image_tokens", image_tokens, 1)
        self.tokens = check_int("tokens", tokens, 1, self.image_tokens)

        attention = self.layers[self.layer - 1].self_attn
        if not all(hasattr(attention, name) for name in ("q_proj", "k_proj", "head_dim", "scaling")):
            raise ValueError(f"FastV supports Llama-style attention (q_proj, k_proj); got {type(attention).__name__}")
        if getattr(attention, "q_norm", None) is not None or getattr(attention, "k_norm", None) is not None:
            raise ValueError(f"FastV does not support attention with q/k normalisation ({type(attention).__name__})")
        self._attention = attention
        self._num_heads = attention.q_proj.out_features // attention.head_dim
        self._num_kv_heads = attention.k_proj.out_features // attention.head_dim
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._reset()
        self.last_kept: torch.Tensor | None = None  # (B, L') positions kept by the last pruned prefill

    @staticmethod
    def unsupported_reason(model: nn.Module) -> str | None:
        """Why FastV cannot run on `model` (None when it can): the checks that need no budget."""
        try:
            language_model = _language_model(model)
        except ValueError as error:
            return str(error)
        attention = getattr(language_model.layers[0], "self_attn", None) if len(language_model.layers) else None
        if isinstance(getattr(attention, "q_norm", None), nn.Module) or isinstance(
            getattr(attention, "k_norm", None), nn.Module
        ):
            return f"model: FastV does not support attention with q/k normalisation ({type(attention).__name__})"
        text_config = getattr(model.config, "text_config", model.config)
        rope = getattr(text_config, "rope_parameters", None) or getattr(text_config, "rope_scaling", None) or {}
        if isinstance(rope, dict) and "mrope_section" in rope:
            return f"model: FastV supports standard rotary embeddings; {type(model).__name__} uses M-RoPE"
        return None

    # --- lifecycle ---------------------------------------------------------------------------
    def install(self) -> FastV:
        if self._handles:
            raise ValueError("FastV is already installed on this model")
        hooks = [
            self.model.model.register_forward_pre_hook(self._on_model, with_kwargs=True),
            self.language_model.register_forward_pre_hook(self._on_language_model, with_kwargs=True),
            self._attention.register_forward_pre_hook(self._on_scoring_attention, with_kwargs=True),
            self._attention.q_proj.register_forward_hook(self._capture("queries")),
            self._attention.k_proj.register_forward_hook(self._capture("keys")),
        ]
        hooks += [
            layer.register_forward_pre_hook(self._on_pruned_layer, with_kwargs=True)
            for layer in self.layers[self.layer :]
        ]
        self._handles = hooks
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._reset()

    def __enter__(self) -> FastV:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _reset(self) -> None:
        self._visual: torch.Tensor | None = None  # (B, L) image-token positions of the current prompt
        self._scoring = False  # the current forward is a prefill that will be pruned
        self._captured: dict[str, Any] = {}
        self._keep: torch.Tensor | None = None  # (B, L') positions that layers >= K keep
        self._full_length = 0
        self._prefill: dict[str, Any] | None = None  # sliced layer arguments of the running prefill

    # --- hooks -------------------------------------------------------------------------------
    def _on_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self._visual = input_ids == self.image_token_id if isinstance(input_ids, torch.Tensor) else None

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        past = passed_cache(kwargs)  # `cache` from transformers 5.25, `past_key_values` before
        past_length = past.get_seq_length() if past is not None else 0
        if past_length > 0:  # decoding: layers >= K keep what the prefill kept
            self._prefill = None
            return
        self._keep, self._prefill, self._captured = None, None, {}
        self._full_length = embeds.shape[1] if embeds is not None else 0
        visual = self._visual
        self._scoring = bool(
            visual is not None and embeds is not None and visual.shape == embeds.shape[:2] and visual.any()
        )
        if embeds is not None and self._visual is None and self._full_length > 1:
            raise ValueError("FastV needs input_ids to find the image tokens; inputs_embeds alone are not supported")

    def _on_scoring_attention(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self._scoring:
            self._captured["position_embeddings"] = kwargs.get("position_embeddings")
            self._captured["attention_mask"] = kwargs.get("attention_mask")

    def _capture(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._scoring:
                self._captured[name] = output[:, -1] if name == "queries" else output

        return hook

    def _on_pruned_layer(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self._scoring:  # the first pruned layer of a prefill decides what to keep
            self._scoring = False
            self._keep = self._select(self._last_token_attention(), self._visual)
            self.last_kept = self._keep
            self._captured = {}
            if self._keep is not None:
                self._prefill = self._slice_layer_arguments(kwargs)
        if self._keep is None:
            return args, kwargs
        kwargs = dict(kwargs)
        if self._prefill is not None:
            args = list(args)
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] == self._full_length:  # only layer K gets the full sequence
                hidden = _take_rows(hidden, self._keep, 1)
            elif hidden.shape[1] != self._keep.shape[1]:
                raise _unsupported_layout(
                    f"a decoder layer got {hidden.shape[1]} positions, neither the prompt's {self._full_length} "
                    f"nor the {self._keep.shape[1]} kept"
                )
            if args:
                args[0] = hidden
            else:
                kwargs["hidden_states"] = hidden
            kwargs.update(self._prefill)
            return tuple(args), kwargs
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            # Decoding: the mask covers the full prompt plus the new tokens; keep the columns layers >= K still hold.
            if mask.shape[-1] < self._full_length:
                raise _unsupported_layout(
                    f"the decoding attention mask covers {mask.shape[-1]} positions, fewer than the "
                    f"{self._full_length}-token prompt"
                )
            new = torch.arange(self._full_length, mask.shape[-1], device=mask.device).expand(self._keep.shape[0], -1)
            kwargs["attention_mask"] = _take_rows(mask, torch.cat([self._keep.to(mask.device), new], dim=1), 3)
        return args, kwargs

    # --- selection ---------------------------------------------------------------------------
    def _last_token_attention(self) -> torch.Tensor:
        """(B, L) softmax attention of the last position in layer K - 1, averaged over heads."""
        queries, keys = self._captured["queries"], self._captured["keys"]
        position_embeddings = self._captured.get("position_embeddings")
        if position_embeddings is None or position_embeddings[0].ndim != 3:
            raise ValueError("FastV supports standard rotary embeddings only (cos/sin of shape (batch, length, dim))")
        cos, sin = position_embeddings
        batch, length = keys.shape[:2]
        if cos.shape[1] != length or length != self._full_length:
            raise _unsupported_layout(
                f"layer {self.layer - 1} computed keys for {length} positions and rotary embeddings for "
                f"{cos.shape[1]}, expected the prompt's {self._full_length}"
            )
        head_dim = self._attention.head_dim
        queries = queries.view(batch, self._num_heads, head_dim)
        keys = keys.view(batch, length, self._num_kv_heads, head_dim)
        last_cos, last_sin = cos[:, -1].unsqueeze(1), sin[:, -1].unsqueeze(1)
        queries = queries * last_cos + rotate_half(queries) * last_sin
        keys = keys * cos.unsqueeze(2) + rotate_half(keys) * sin.unsqueeze(2)
        keys = keys.repeat_interleave(self._num_heads // self._num_kv_heads, dim=2)
        logits = torch.einsum("bhd,blhd->bhl", queries.float(), keys.float()) * self._attention.scaling
        mask = self._captured.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            row = mask[:, :, -1, :length]
            logits = logits.masked_fill(~row, float("-inf")) if row.dtype == torch.bool else logits + row.float()
        return logits.softmax(dim=-1).mean(dim=1)

    def _select(self, scores: torch.Tensor, visual: torch.Tensor) -> torch.Tensor | None:
        """Ascending positions (B, L') to keep: every non-image token plus the top image tokens."""
        counts = visual.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError(
                f"FastV needs every sample of a batch to hold the same number of image tokens, got {counts.tolist()}"
            )
        num_visual = int(counts[0])
        keep_visual = min(num_visual, max(1, round(num_visual * self.tokens / self.image_tokens)))
        if keep_visual >= num_visual:
            return None
        visual = visual.to(scores.device)
        top = scores.masked_fill(~visual, float("-inf")).topk(keep_visual, dim=1).indices
        keep = (~visual).scatter(1, top, True)
        return keep.nonzero()[:, 1].view(keep.shape[0], -1)

    def _slice_layer_arguments(self, kwargs: dict) -> dict[str, Any]:
        keep = self._keep
        sliced: dict[str, Any] = {}
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.ndim == 4:
            sliced["attention_mask"] = _take_rows(_take_rows(mask, keep, 2), keep, 3)
        cos_sin = kwargs.get("position_embeddings")
        if cos_sin is not None:
            sliced["position_embeddings"] = tuple(_take_rows(t, keep.to(t.device), 1) for t in cos_sin)
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2:
            sliced["position_ids"] = _take_rows(position_ids, keep.to(position_ids.device), 1)
        return sliced
