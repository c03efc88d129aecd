"""VisionZip inside vLLM for Qwen2.5-VL: each image (and each temporal slice of a video) reaches the
language model as its reduced tokens, at the 3-D M-RoPE positions they have in the unreduced prompt.

Registered with vLLM by `vlmzip.serving.register` as `VisionZipQwen2_5_VLForConditionalGeneration`;
`vlmzip export` writes model directories that name it. Importing this module imports vLLM. The
mixins here (processor, processing info, model) are shared with the Qwen3-VL class
(`vlmzip.serving.qwen3`), which differs in its tower (no windows, deepstack) and video layout.

What differs from vLLM's own `Qwen2_5_VLForConditionalGeneration`:
- Placeholders: the processor (vLLM's prompt updates, the HF processor's own expansion and the
  token counts vLLM profiles and schedules with) gives every image `ServingBudget.item_tokens`
  tokens: the fixed budget or the `retention` share of its merged tokens, known from its grid
  before anything runs.
- Encoder: the tower runs as in vLLM; the queries and keys of its last full-attention block are
  captured (fused `qkv` output, vLLM's own rotary), so each merge unit is scored by the attention
  its patches receive, as `vlmzip.adapters.qwen2_vl` does in transformers; the method then reduces
  the merger's output. Each reduced token takes the slot of its merge unit (a contextual token the
  slot of its target), in ascending slot order.
- M-RoPE: `get_mrope_input_positions` (at admission, before the encoder) gives text its exact
  positions, which do not depend on the selection: text after an image continues from the
  unreduced image's largest position + 1, and decoding continues from the same next position as
  without VisionZip. An image's tokens get a provisional position whose first axis is the image's
  start. The encoder appends each kept token's (t, h, w) offset to its embedding (it travels through
  vLLM's encoder cache with it); `embed_input_ids` takes the columns off and `forward` sets the
  positions of exactly the image tokens computed in this step to start + offset. This needs no
  help from the model runner (vLLM's post-encoder `recompute_mrope_positions` hook is called only
  with EVS pruning on, and not by the CPU runner), and it holds for chunked prefill, prefix-cache
  hits (cached tokens keep the keys computed at their right positions) and preemption.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
from vllm.config import VllmConfig
from vllm.distributed import tensor_model_parallel_all_gather
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from vlmzip.adapters.qwen2_vl import reduced_slots
from vlmzip.methods import get_method
from vlmzip.probe import ProbeOutput, received_attention
from vlmzip.serving.settings import ServingBudget, check_architecture, resolve_budget

# Columns appended to each reduced token's embedding: its (t, h, w) offset within the image and the
# image's extent (largest unreduced offset + 1), each as (value // BASE, value % BASE) so that they
# stay exact in bfloat16 (integers up to 256 are exact there).
POSITION_BASE = 128
POSITION_COLUMNS = 8


# --- placeholder counts -------------------------------------------------------------------------
class BudgetedProcessorMixin:
    """A transformers Qwen processor expanding each image into its reduced token count."""

    visionzip_budget: ServingBudget
    image_token: str
    image_processor: Any

    def _reduced(self, grid: Any, processor: Any) -> int:
        frames, height, width = (int(v) for v in grid)
        return self.visionzip_budget.item_tokens(height * width // processor.merge_size**2, frames)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        return self.image_token * self._reduced(image_inputs["image_grid_thw"][image_idx], self.image_processor)

    def _get_num_multimodal_tokens(self, image_sizes: Any = None, video_sizes: Any = None, **kwargs: Any) -> Any:
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)  # type: ignore[misc]
        if image_sizes is not None:
            data["num_image_tokens"] = [self.visionzip_budget.item_tokens(n) for n in data["num_image_tokens"]]
        return data


class _BudgetedQwenProcessor(BudgetedProcessorMixin, Qwen2_5_VLProcessor):
    """transformers' Qwen2.5-VL processor expanding each image / video into its reduced token count."""

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        return self.video_token * self._reduced(video_inputs["video_grid_thw"][video_idx], self.video_processor)


class BudgetedInfoMixin:
    """Processing info whose images and videos take their reduced token counts (`ServingBudget.item_tokens`)."""

    budgeted_processor: type
    ctx: Any

    def visionzip_budget(self) -> ServingBudget:
        budget = self.__dict__.get("_visionzip_budget")
        if budget is None:
            budget = resolve_budget(self.ctx.model_config.model, self.get_hf_config())
            self.__dict__["_visionzip_budget"] = budget
        return budget

    def get_hf_config(self) -> Any:
        check_architecture(self.ctx.model_config.hf_config)
        return super().get_hf_config()  # type: ignore[misc]

    def get_hf_processor(self, **kwargs: object) -> Any:
        processor = copy.copy(super().get_hf_processor(**kwargs))  # type: ignore[misc]  # vLLM caches the original
        processor.__class__ = self.budgeted_processor
        processor.visionzip_budget = self.visionzip_budget()
        return processor

    def _get_vision_info(self, *, num_frames: int = 1, **kwargs: Any) -> tuple[Any, int]:
        size, full = super()._get_vision_info(num_frames=num_frames, **kwargs)  # type: ignore[misc]
        if self.__dict__.get("_visionzip_unreduced"):
            return size, full
        temporal = int(self.get_hf_config().vision_config.temporal_patch_size)
        frames = max((num_frames + (-num_frames % temporal)) // temporal, 1)
        return size, self.visionzip_budget().item_tokens(full // frames, frames)


class VisionZipQwen2_5_VLProcessingInfo(BudgetedInfoMixin, Qwen2_5_VLProcessingInfo):
    """Qwen2.5-VL processing info whose images and videos take their reduced token counts."""

    budgeted_processor = _BudgetedQwenProcessor


class VisionZipQwen2_5_VLMultiModalProcessor(Qwen2_5_VLMultiModalProcessor):
    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any) -> Any:
        hf_processor = self.info.get_hf_processor(**hf_processor_mm_kwargs)
        vocab = self.info.get_tokenizer().get_vocab()
        placeholder = {"image": vocab[hf_processor.image_token], "video": vocab[hf_processor.video_token]}
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)
        budget = self.info.visionzip_budget()

        def replacement(item_idx: int, modality: str) -> list[int]:
            frames, height, width = out_mm_kwargs[modality][item_idx][f"{modality}_grid_thw"].data.tolist()
            return [placeholder[modality]] * budget.item_tokens(height * width // merge**2, frames)

        return [
            PromptReplacement(
                modality=modality, target=[placeholder[modality]], replacement=partial(replacement, modality=modality)
            )
            for modality in ("image", "video")
        ]


# --- the encoder --------------------------------------------------------------------------------
def last_full_attention(visual: nn.Module) -> nn.Module:
    """Qwen2.5-VL's scoring attention: its last full-attention (not windowed) block."""
    full = [int(i) for i in visual.fullatt_block_indexes if 0 <= int(i) < len(visual.blocks)]
    if not full:
        indexes = list(visual.fullatt_block_indexes)
        raise ValueError(
            f"Qwen2.5-VL tower has no full-attention block (fullatt_block_indexes={indexes}); "
            "VisionZip needs one to score whole images"
        )
    return visual.blocks[max(full)].attn


def window_order(visual: nn.Module, grid_thw: Sequence[Sequence[int]]) -> torch.Tensor:
    """Qwen2.5-VL's `window_index`: merge unit i of the permuted sequence is unit window_index[i]."""
    return visual.prepare_encoder_metadata([list(g) for g in grid_thw])["window_index"]


def probe_tower(
    visual: nn.Module,
    pixel_values: torch.Tensor,
    grid_thw: Sequence[Sequence[int]],
    attention: nn.Module,
    unit_order: Callable[[nn.Module, Sequence[Sequence[int]]], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run a vLLM Qwen tower: (merged tokens, unit scores, unit keys), all in merge-unit raster order.

    A unit's score is the attention its patches receive in the block of `attention` (averaged over
    the queries of its image or frame, summed over heads and patches); its key is that block's keys
    (bias included, before rotary) averaged over heads and patches. `unit_order` gives the tower's
    permutation of merge units (Qwen2.5-VL's windows), undone here. The merged tokens are the
    tower's output as it is: for Qwen3-VL, the merger's output followed by the deepstack mergers'
    along the channels, so that one reduction selects and merges them all alike.
    """
    captured: dict[str, Any] = {}

    def keep_arguments(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> None:
        captured.update(
            cu_seqlens=kwargs["cu_seqlens"], cos=kwargs["rotary_pos_emb_cos"], sin=kwargs["rotary_pos_emb_sin"]
        )

    def keep_qkv(module: nn.Module, args: Any, output: Any) -> None:
        captured["qkv"] = output[0] if isinstance(output, tuple) else output

    handles = [
        attention.register_forward_pre_hook(keep_arguments, with_kwargs=True),
        attention.qkv.register_forward_hook(keep_qkv),
    ]
    try:
        merged = visual(pixel_values, grid_thw=[list(g) for g in grid_thw])
    finally:
        for handle in handles:
            handle.remove()
    qkv = captured["qkv"].reshape(captured["qkv"].shape[0], -1)  # (patches, 3 * heads * head_dim), [q | k | v]
    queries, keys, _ = qkv.chunk(3, dim=-1)
    if getattr(attention, "tp_size", 1) > 1:  # each rank holds its own heads: score over all of them
        queries = tensor_model_parallel_all_gather(queries.contiguous())
        keys = tensor_model_parallel_all_gather(keys.contiguous())
    head_dim = int(attention.hidden_size_per_attention_head)
    patches = qkv.shape[0]
    queries, keys = queries.reshape(patches, -1, head_dim), keys.reshape(patches, -1, head_dim)
    rotated = attention.apply_rotary_emb(torch.stack([queries, keys]).contiguous(), captured["cos"], captured["sin"])
    rotated_queries, rotated_keys = rotated.unbind(0)
    scores = torch.empty(patches, dtype=torch.float32, device=qkv.device)
    bounds = captured["cu_seqlens"].tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        scores[start:end] = received_attention(
            rotated_queries[None, start:end], rotated_keys[None, start:end], head_dim**-0.5
        )[0]
    unit = int(visual.spatial_merge_size) ** 2  # a merge unit's patches are consecutive
    unit_scores = scores.view(-1, unit).sum(dim=1)
    unit_keys = keys.float().mean(dim=1).view(-1, unit, head_dim).mean(dim=1)
    if unit_order is not None:
        restore = torch.argsort(unit_order(visual, grid_thw).to(unit_scores.device))
        unit_scores, unit_keys = unit_scores[restore], unit_keys[restore]
    return merged, unit_scores, unit_keys


def encode_position_columns(offsets: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(tokens, 4) non-negative integer offsets -> (tokens, 8) columns exact in `dtype`."""
    if int(offsets.max()) >= POSITION_BASE * 256:
        raise ValueError(f"an image spans more than {POSITION_BASE * 256} M-RoPE positions")
    return torch.cat([offsets // POSITION_BASE, offsets % POSITION_BASE], dim=1).to(dtype)


def decode_position_columns(columns: torch.Tensor) -> torch.Tensor:
    """Inverse of `encode_position_columns`: (tokens, 8) -> (4, tokens) long."""
    values = columns.float().round().long()
    return (values[:, :4] * POSITION_BASE + values[:, 4:]).T


# (placeholder offset, temporal slices, merged rows, merged cols, t_factor, placeholder length) of a run
PositionItem = tuple[int, int, int, int, float, int]


# --- the model ----------------------------------------------------------------------------------
class VisionZipQwenMixin:
    """VisionZip in a vLLM Qwen model's encoder path, with the M-RoPE positions of the unreduced prompt.

    A family class names its scoring attention (`scoring_attention`, `unit_order`), the time axis of
    its videos (`video_t_factors`) and its placeholder runs (`position_items`).
    """

    visual: nn.Module
    config: Any
    unit_order: ClassVar[Callable[[nn.Module, Sequence[Sequence[int]]], torch.Tensor] | None] = None

    def _init_visionzip(self, vllm_config: VllmConfig) -> ServingBudget:
        """The budget, after checking it and the engine options (before any weight is allocated)."""
        model_config = vllm_config.model_config
        budget = resolve_budget(model_config.model, model_config.hf_config)
        if model_config.get_multimodal_config().is_multimodal_pruning_enabled():
            raise ValueError("--video-pruning-rate: VisionZip reduces the visual tokens itself; leave EVS off")
        if vllm_config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                "pipeline parallelism is not supported by VisionZip serving: the reduced tokens' positions are set "
                "where the embeddings are merged (first stage only); use tensor parallelism"
            )
        return budget

    def _finish_init(self, budget: ServingBudget) -> None:
        self.visionzip_budget = budget
        self.visionzip_method = get_method(self.visionzip_budget.config.method)
        self._visionzip_offsets: tuple[torch.Tensor, torch.Tensor] | None = None

    def scoring_attention(self) -> nn.Module:
        raise NotImplementedError

    def video_t_factors(self, inputs: Mapping[str, Any], count: int) -> list[float]:
        raise NotImplementedError

    def position_items(self, input_tokens: list[int], mm_features: list[Any]) -> list[PositionItem]:
        raise NotImplementedError

    # --- encoder ---------------------------------------------------------------------------------
    def _reduce_item(
        self, merged: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, grid: Sequence[int], t_factor: float
    ) -> torch.Tensor:
        frames, height, width = (int(v) for v in grid)
        merge = int(self.visual.spatial_merge_size)
        rows, cols = height // merge, width // merge
        units = rows * cols
        config = self.visionzip_budget.frame_config(units, frames)
        extent = max(int((frames - 1) * t_factor), rows - 1, cols - 1) + 1
        features, offsets = [], []
        for frame in range(frames):
            span = slice(frame * units, (frame + 1) * units)
            if config is None:
                frame_features, slots = merged[span], torch.arange(units, device=merged.device)
            else:
                probe = ProbeOutput(
                    features=merged[span][None],
                    scores=scores[span][None],
                    keys=keys[span][None],
                    has_cls=False,
                    num_prefix_tokens=0,
                    grid=(rows, cols),
                )
                reduction = self.visionzip_method(probe, config)
                slots = reduced_slots(reduction)
                order = slots.argsort()
                frame_features, slots = reduction.features[0][order], slots[order]
            time = torch.full_like(slots, int(frame * t_factor))
            offsets.append(torch.stack([time, slots // cols, slots % cols, torch.full_like(slots, extent)], dim=1))
            features.append(frame_features)
        features = torch.cat(features)
        return torch.cat([features, encode_position_columns(torch.cat(offsets), features.dtype)], dim=1)

    def _embed_items(
        self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, t_factors: list[float]
    ) -> list[torch.Tensor]:
        grids = grid_thw.tolist()
        merged, scores, keys = probe_tower(
            self.visual, pixel_values, grids, self.scoring_attention(), type(self).unit_order
        )
        merge = int(self.visual.spatial_merge_size)
        items, start = [], 0
        for grid, t_factor in zip(grids, t_factors, strict=True):
            size = grid[0] * grid[1] * grid[2] // merge**2
            span = slice(start, start + size)
            items.append(self._reduce_item(merged[span], scores[span], keys[span], grid, t_factor))
            start += size
        return items

    def embed_multimodal(self, **kwargs: object) -> list[torch.Tensor]:
        items: list[torch.Tensor] = []
        for modality, inputs in self._parse_and_validate_multimodal_inputs(**kwargs).items():  # type: ignore[attr-defined]
            if inputs is None:
                continue
            if inputs["type"] not in ("pixel_values", "pixel_values_videos"):
                raise ValueError(
                    f"VisionZip serving reduces {modality}s from pixels; precomputed {modality} embeddings "
                    "cannot be reduced"
                )
            if modality == "image":
                grid = inputs["image_grid_thw"]
                items += self._embed_items(inputs["pixel_values"], grid, [1.0] * len(grid))
            else:
                grid = inputs["video_grid_thw"]
                items += self._embed_items(inputs["pixel_values_videos"], grid, self.video_t_factors(inputs, len(grid)))
        return items

    # --- M-RoPE ----------------------------------------------------------------------------------
    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """Exact text positions and provisional image positions (see the module docstring)."""
        parts: list[np.ndarray] = []
        start, next_position = 0, 0
        for offset, frames, rows, cols, t_factor, length in self.position_items(input_tokens, mm_features):
            text = offset - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            first = next_position + text
            extent = max(int((frames - 1) * t_factor), rows - 1, cols - 1) + 1
            provisional = np.full((3, length), first, dtype=np.int64)
            provisional[2] = first + extent - 1  # keeps the image's largest position in the array
            parts.append(provisional)
            next_position, start = first + extent, offset + length
        if start < len(input_tokens):
            text = len(input_tokens) - start
            parts.append(np.broadcast_to(np.arange(text), (3, text)) + next_position)
            next_position += text
        positions = np.concatenate(parts, axis=1) if parts else np.zeros((3, 0), dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(positions)), next_position - len(input_tokens)

    def embed_input_ids(
        self,
        input_ids: torch.Tensor,
        multimodal_embeddings: Sequence[torch.Tensor] | None = None,
        *,
        is_multimodal: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """vLLM's embedding merge, after taking the position columns off the reduced tokens.

        The offsets are kept, with the mask of the tokens they belong to, for this step's `forward`.
        """
        self._visionzip_offsets = None
        if multimodal_embeddings is not None and len(multimodal_embeddings) > 0:
            columns = torch.cat([e[:, -POSITION_COLUMNS:] for e in multimodal_embeddings])
            self._visionzip_offsets = (is_multimodal, decode_position_columns(columns))
            multimodal_embeddings = [e[:, :-POSITION_COLUMNS] for e in multimodal_embeddings]
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal, **kwargs)  # type: ignore[misc]

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: Any = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> Any:
        """The family's forward with each reduced token at its image start + its own (t, h, w) offset.

        The provisional position of every image token holds the image's start on its first axis.
        """
        pending, self._visionzip_offsets = getattr(self, "_visionzip_offsets", None), None
        if pending is not None and positions.ndim == 2:
            is_multimodal, offsets = pending
            tokens = is_multimodal.to(positions.device).nonzero().squeeze(1)
            positions = positions.clone()
            positions[:, tokens] = positions[0, tokens][None] + offsets[:3].to(positions.device)
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)  # type: ignore[misc]


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipQwen2_5_VLMultiModalProcessor,
    info=VisionZipQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class VisionZipQwen2_5_VLForConditionalGeneration(VisionZipQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with VisionZip in the image and video path."""

    unit_order = staticmethod(window_order)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        budget = self._init_visionzip(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._finish_init(budget)

    def scoring_attention(self) -> nn.Module:
        return last_full_attention(self.visual)

    def video_t_factors(self, inputs: Mapping[str, Any], count: int) -> list[float]:
        """A temporal slice's time step in M-RoPE positions: seconds per slice x tokens per second."""
        tokens_per_second = float(getattr(self.config.vision_config, "tokens_per_second", 1.0))
        seconds = inputs.get("second_per_grid_ts")
        seconds = [1.0] * count if seconds is None else [float(s) for s in torch.as_tensor(seconds).flatten()]
        return [s * tokens_per_second for s in seconds]

    def position_items(self, input_tokens: list[int], mm_features: list[Any]) -> list[PositionItem]:
        lengths = {f.mm_position.offset: f.mm_position.length for f in mm_features}
        return [
            (offset, frames, rows, cols, t_factor, lengths[offset])
            for offset, frames, rows, cols, t_factor in self.iter_mm_grid_thw(mm_features)
        ]
