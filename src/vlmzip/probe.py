"""Run a vision tower up to its feature layer and capture what VisionZip needs from that layer.

Only the feature layer's query/key projections are hooked; the attention itself keeps running on
whatever backend the model uses (sdpa, flash, ...), no `output_attentions=True` is needed, and
the encoder stops right after the feature layer: later layers never run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlmzip.core import BatchRows, batch_rows, batches_to_cat

# Queries per block of the received-attention scoring; None sizes blocks by SCORE_BLOCK_ELEMENTS.
DEFAULT_QUERY_CHUNK: int | None = None
# Attention probabilities computed at once (batch x heads x queries x keys): 2M float32 values (8 MiB) stay in
# a CPU's cache from the score product through the softmax to the sum. Blocks several times larger make the
# scoring memory-bound (2.5x slower on a 2,304-patch Qwen image); far smaller ones pay per-call overhead.
SCORE_BLOCK_ELEMENTS = 1 << 21


def _capture_outputs(queries: nn.Module, keys: nn.Module, captured: dict[str, torch.Tensor]) -> list[RemovableHandle]:
    """Hook two modules: the first one's output is stored as captured["queries"], the second's as ["keys"]."""

    def keep_output(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured[name] = _first(output)

        return hook

    return [queries.register_forward_hook(keep_output("queries")), keys.register_forward_hook(keep_output("keys"))]


def capture_q_k_projections(attention: nn.Module, captured: dict[str, torch.Tensor]) -> list[RemovableHandle]:
    """Hook separate `q_proj` / `k_proj` modules: their outputs are the queries and keys, (B, N, heads * d)."""
    return _capture_outputs(attention.q_proj, attention.k_proj, captured)


def capture_normed_q_k(attention: nn.Module, captured: dict[str, torch.Tensor]) -> list[RemovableHandle]:
    """Hook `q_norm` / `k_norm` (identities when the tower has no q/k normalisation): the queries and keys
    the attention really uses, (B, N, heads * d). InternViT's attention applies them after the projections."""
    return _capture_outputs(attention.q_norm, attention.k_norm, captured)


@dataclass(frozen=True)
class TowerLayout:
    """Where a tower family keeps the pieces the probe needs."""

    layers: Callable[[nn.Module], nn.ModuleList]
    attention: Callable[[nn.Module], nn.Module]  # encoder layer -> its self-attention module
    has_cls: bool
    num_prefix_tokens: Callable[[Any], int]  # config -> tokens before the patches ([CLS], registers)
    # (attention module, dict) -> hook handles that store "queries" and "keys" (B, N, heads * d) in the
    # dict; towers with a fused qkv projection (e.g. vLLM's) supply their own.
    capture_qk: Callable[[nn.Module, dict[str, torch.Tensor]], list[RemovableHandle]] = capture_q_k_projections


def _clip_like_layers(tower: nn.Module) -> nn.ModuleList:
    transformer = getattr(tower, "vision_model", tower)
    return transformer.encoder.layers


# Keyed by class name so that the table needs no imports of optional model code.
TOWER_LAYOUTS: dict[str, TowerLayout] = {
    "CLIPVisionModel": TowerLayout(_clip_like_layers, lambda layer: layer.self_attn, True, lambda c: 1),
    "CLIPVisionTransformer": TowerLayout(_clip_like_layers, lambda layer: layer.self_attn, True, lambda c: 1),
    "CLIPVisionModelWithProjection": TowerLayout(_clip_like_layers, lambda layer: layer.self_attn, True, lambda c: 1),
    "SiglipVisionModel": TowerLayout(_clip_like_layers, lambda layer: layer.self_attn, False, lambda c: 0),
    "SiglipVisionTransformer": TowerLayout(_clip_like_layers, lambda layer: layer.self_attn, False, lambda c: 0),
    "Dinov2Model": TowerLayout(lambda t: t.encoder.layer, lambda layer: layer.attention, True, lambda c: 1),
    "Dinov2WithRegistersModel": TowerLayout(
        lambda t: t.encoder.layer,
        lambda layer: layer.attention,
        True,
        lambda c: 1 + int(getattr(c, "num_register_tokens", 0)),
    ),
    "InternVLVisionModel": TowerLayout(
        lambda t: t.encoder.layer, lambda layer: layer.attention, True, lambda c: 1, capture_normed_q_k
    ),
}


def supported_towers() -> list[str]:
    return sorted(TOWER_LAYOUTS)


@dataclass(frozen=True)
class TowerInfo:
    """A resolved tower: its layout plus the numbers derived from its config."""

    layout: TowerLayout
    layers: nn.ModuleList
    num_heads: int
    patch_size: int
    num_channels: int
    num_prefix_tokens: int

    @property
    def has_cls(self) -> bool:
        return self.layout.has_cls

    def feature_layer_index(self, feature_layer: int) -> int:
        """Index into `layers` of the layer whose output is `hidden_states[feature_layer]`.

        `hidden_states` has len(layers) + 1 entries (the embeddings first), so -2 is the output of
        the second-to-last layer. The embeddings (index 0) have no attention and cannot be used.
        """
        num_layers = len(self.layers)
        if isinstance(feature_layer, bool) or not isinstance(feature_layer, int):
            raise TypeError(f"feature_layer must be an int, got {feature_layer!r}")
        if not (-num_layers <= feature_layer <= -1 or 1 <= feature_layer <= num_layers):
            raise ValueError(
                f"feature_layer must be in [-{num_layers}, -1] or [1, {num_layers}] for this "
                f"{num_layers}-layer tower, got {feature_layer}"
            )
        return feature_layer % (num_layers + 1) - 1

    def num_tokens(self, height: int, width: int) -> int:
        return self.num_prefix_tokens + (height // self.patch_size) * (width // self.patch_size)


def resolve_tower(vision_model: nn.Module, layout: TowerLayout | None = None) -> TowerInfo:
    """Look up `vision_model`'s layout (unless one is given), or raise naming the supported towers."""
    if not isinstance(vision_model, nn.Module):
        raise TypeError(f"vision_model must be a transformers vision tower (nn.Module), got {type(vision_model)}")
    name = type(vision_model).__name__
    layout = TOWER_LAYOUTS.get(name) if layout is None else layout
    if layout is None:
        raise ValueError(f"vision_model: unsupported vision tower {name}; supported: {supported_towers()}")
    config = vision_model.config
    return TowerInfo(
        layout=layout,
        layers=layout.layers(vision_model),
        num_heads=int(config.num_attention_heads),
        patch_size=square_size(config.patch_size, "patch_size"),
        num_channels=int(getattr(config, "num_channels", 3)),
        num_prefix_tokens=layout.num_prefix_tokens(config),
    )


def square_size(value: Any, name: str) -> int:
    """A config size given as an int or as an equal (height, width) pair (InternViT's), as one int."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2 or int(value[0]) != int(value[1]):
            raise ValueError(f"vision config: {name} must be square, got {list(value)}")
        value = value[0]
    return int(value)


def check_finite(name: str, values: torch.Tensor) -> torch.Tensor:
    """Raise when a floating-point tensor holds NaN or infinity (one vectorised check, no Python loop)."""
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise ValueError(
            f"{name} holds NaN or infinite values; they would make every feature NaN and the kept tokens meaningless"
        )
    return values


def check_pixel_values(pixel_values: object, tower: TowerInfo) -> torch.Tensor:
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor, got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have shape (batch, channels, height, width), got shape {tuple(pixel_values.shape)}"
        )
    if not pixel_values.is_floating_point():
        raise TypeError(f"pixel_values must be a floating-point tensor, got dtype {pixel_values.dtype}")
    if pixel_values.shape[1] != tower.num_channels:
        raise ValueError(f"pixel_values must have {tower.num_channels} channels (dim 1), got {pixel_values.shape[1]}")
    if pixel_values.shape[0] == 0:
        raise ValueError("pixel_values must hold at least one image, got batch size 0")
    height, width = pixel_values.shape[-2:]
    if height < tower.patch_size or width < tower.patch_size:
        raise ValueError(
            f"pixel_values images must be at least {tower.patch_size}x{tower.patch_size} pixels, got {height}x{width}"
        )
    return check_finite("pixel_values", pixel_values)


@dataclass
class ProbeOutput:
    """What the feature layer yields for one batch of images.

    features: (B, N, hidden) output of the feature layer (no post-layernorm).
    scores: (B, N - 1) [CLS]-row attention to every other token summed over heads (towers with [CLS]),
        or (B, N) attention each token receives, averaged over queries, summed over heads (without).
    keys: (B, N, head_dim) the layer's keys (k_proj output, bias included, unscaled) averaged over heads.
    grid: (rows, cols) of the patch grid; patches follow `num_prefix_tokens` leading tokens in raster order.
    """

    features: torch.Tensor
    scores: torch.Tensor
    keys: torch.Tensor
    has_cls: bool
    num_prefix_tokens: int
    grid: tuple[int, int]

    @classmethod
    def cat(cls, probes: Sequence[ProbeOutput]) -> ProbeOutput:
        """One batch of the rows of `probes`, in order: they must come from one tower layout
        (the same [CLS], prefix tokens and patch grid)."""
        probes = batches_to_cat(probes, ProbeOutput, "probes")
        first = probes[0]
        layout = (first.has_cls, first.num_prefix_tokens, tuple(first.grid))
        for probe in probes[1:]:
            if (probe.has_cls, probe.num_prefix_tokens, tuple(probe.grid)) != layout:
                raise ValueError(
                    "probes must share has_cls, num_prefix_tokens and grid, got "
                    f"{layout} and {(probe.has_cls, probe.num_prefix_tokens, tuple(probe.grid))}"
                )
        return cls(
            features=torch.cat([p.features for p in probes]),
            scores=torch.cat([p.scores for p in probes]),
            keys=torch.cat([p.keys for p in probes]),
            has_cls=first.has_cls,
            num_prefix_tokens=first.num_prefix_tokens,
            grid=first.grid,
        )

    def __getitem__(self, rows: BatchRows) -> ProbeOutput:
        """The probe of the rows `rows` of the batch (an int keeps its batch dimension: one row)."""
        return dataclasses.replace(
            self,
            features=batch_rows(self.features, rows),
            scores=batch_rows(self.scores, rows),
            keys=batch_rows(self.keys, rows),
        )

    def to(self, device: torch.device | str) -> ProbeOutput:
        """The same probe with its tensors on `device`."""
        return dataclasses.replace(
            self, features=self.features.to(device), scores=self.scores.to(device), keys=self.keys.to(device)
        )


class _StopAfterFeatureLayer(Exception):
    """Raised by a hook once the feature layer has run, so that later layers never do."""


def cls_attention(queries: torch.Tensor, keys: torch.Tensor, scale: float) -> torch.Tensor:
    """[CLS]-row softmax attention summed over heads, without [CLS]'s own column.

    queries: (B, H, d) of the [CLS] token; keys: (B, N, H, d). Returns (B, N - 1) in float32.
    """
    logits = torch.einsum("bhd,bnhd->bhn", queries.float(), keys.float()) * scale
    return logits.softmax(dim=-1).sum(dim=1)[:, 1:]


def received_attention(
    queries: torch.Tensor, keys: torch.Tensor, scale: float, query_chunk: int | None = DEFAULT_QUERY_CHUNK
) -> torch.Tensor:
    """Attention each token receives, averaged over all queries and summed over heads.

    queries, keys: (B, N, H, d). Queries are processed in blocks of `query_chunk` (by default as many as
    keep a block of probabilities within SCORE_BLOCK_ELEMENTS), so memory stays O(chunk * N).
    Returns (B, N) in float32.
    """
    batch, tokens, heads, _ = keys.shape
    if query_chunk is None:
        query_chunk = max(1, SCORE_BLOCK_ELEMENTS // max(1, batch * heads * tokens))
    elif isinstance(query_chunk, bool) or not isinstance(query_chunk, int) or query_chunk < 1:
        raise ValueError(f"query_chunk must be a positive int or None, got {query_chunk!r}")
    keys_t = keys.float().permute(0, 2, 3, 1)  # (B, H, d, N)
    total = keys.new_zeros(batch, tokens, dtype=torch.float32)
    for start in range(0, queries.shape[1], query_chunk):
        # Scaling the queries (chunk x d) instead of the logits (chunk x N) saves one pass over the block.
        chunk = (queries[:, start : start + query_chunk].float() * scale).transpose(1, 2)  # (B, H, c, d)
        total += torch.matmul(chunk, keys_t).softmax(dim=-1).sum(dim=(1, 2))
    return total / queries.shape[1]


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, (tuple, list)) else output


def probe_vision_tower(
    vision_model: nn.Module,
    pixel_values: torch.Tensor,
    feature_layer: int = -2,
    *,
    query_chunk: int | None = DEFAULT_QUERY_CHUNK,
    layout: TowerLayout | None = None,
    **tower_kwargs: Any,
) -> ProbeOutput:
    """Run `vision_model` up to `feature_layer` and return its output, attention scores and keys.

    `layout` overrides the lookup by class name (for towers outside transformers, e.g. vLLM's).
    """
    tower = resolve_tower(vision_model, layout)
    layer_index = tower.feature_layer_index(feature_layer)
    pixel_values = check_pixel_values(pixel_values, tower)
    layer = tower.layers[layer_index]
    attention = tower.layout.attention(layer)

    captured: dict[str, torch.Tensor] = {}

    def stop_after_layer(module: nn.Module, args: Any, output: Any) -> None:
        captured["features"] = _first(output)
        raise _StopAfterFeatureLayer

    handles = [*tower.layout.capture_qk(attention, captured), layer.register_forward_hook(stop_after_layer)]
    try:
        vision_model(pixel_values=pixel_values, **tower_kwargs)
    except _StopAfterFeatureLayer:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if "features" not in captured:
        raise RuntimeError(f"the vision tower's layer {layer_index} did not run; cannot probe {type(vision_model)}")

    features = captured["features"]
    batch, num_tokens, _ = features.shape
    head_dim = captured["keys"].shape[-1] // tower.num_heads
    scale = float(getattr(attention, "scaling", getattr(attention, "scale", head_dim**-0.5)))
    queries = captured["queries"].view(batch, num_tokens, tower.num_heads, head_dim)
    keys = captured["keys"].view(batch, num_tokens, tower.num_heads, head_dim)
    if tower.has_cls:
        scores = cls_attention(queries[:, 0], keys, scale)
    else:
        scores = received_attention(queries, keys, scale, query_chunk)
    height, width = pixel_values.shape[-2:]
    grid = (height // tower.patch_size, width // tower.patch_size)
    return ProbeOutput(
        features=features,
        scores=scores,
        keys=keys.mean(dim=2),
        has_cls=tower.has_cls,
        num_prefix_tokens=tower.num_prefix_tokens,
        grid=grid,
    )
