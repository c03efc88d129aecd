"""VisionZip inside vLLM for Qwen3-VL: each image, and each temporal slice of a video, reaches the
language model as its reduced tokens (main and deepstack features alike), at the 3-D M-RoPE
positions they have in the unreduced prompt.

Registered with vLLM by `vlmzip.serving.register` as `VisionZipQwen3VLForConditionalGeneration`;
`vlmzip export` writes model directories that name it. Importing this module imports vLLM.

Built from the Qwen2.5-VL class's parts (`vlmzip.serving.qwen`: placeholder counts, the tower
probe, the position columns and their use in `forward`). What differs for Qwen3-VL:
- Scoring: every tower block attends over whole images and frames (no windows), so the last block
  scores, and no permutation needs undoing.
- Deepstack: vLLM's tower returns the merger's output followed, along the channels, by the
  deepstack mergers' outputs. The method reduces that concatenation once, so the deepstack
  features keep exactly the tokens, order and merge groups of the main features (as
  `vlmzip.adapters.qwen3_vl` does in transformers); vLLM's own embedding merge then splits them
  and adds the deepstack part to the language model's first layers at the reduced tokens.
- Video: each temporal slice is its own placeholder run after a textual timestamp
  (`<0.5 seconds><|vision_start|>...<|vision_end|>`), with M-RoPE positions like an image's (the time
  is in the text, not on the first axis). vLLM expands a video's runs itself, from the grid, so
  the processor shrinks each run to the slice's reduced count afterwards; the timestamps stay.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.models.qwen3_vl import Qwen3VLProcessor
from vllm.config import VllmConfig
from vllm.model_executor.models.qwen3_vl import (
    Qwen3VLDummyInputsBuilder,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMultiModalProcessor,
    Qwen3VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vlmzip.serving.qwen import BudgetedInfoMixin, BudgetedProcessorMixin, PositionItem, VisionZipQwenMixin


class _BudgetedQwen3Processor(BudgetedProcessorMixin, Qwen3VLProcessor):
    """transformers' Qwen3-VL processor: images and each video slice's run at their reduced counts."""

    def replace_video_token(self, video_inputs: dict, video_idx: int, **kwargs: Any) -> str:
        text = super().replace_video_token(video_inputs, video_idx, **kwargs)
        frames, height, width = (int(v) for v in video_inputs["video_grid_thw"][video_idx])
        units = height * width // self.video_processor.merge_size**2
        reduced = self.visionzip_budget.item_tokens(units, frames) // frames
        start, end = self.vision_start_token, self.vision_end_token
        return text.replace(start + self.video_token * units + end, start + self.video_token * reduced + end)


class VisionZipQwen3VLProcessingInfo(BudgetedInfoMixin, Qwen3VLProcessingInfo):
    """Qwen3-VL processing info whose images and video slices take their reduced token counts."""

    budgeted_processor = _BudgetedQwen3Processor

    def get_max_video_tokens(self, seq_len: int, mm_counts: Mapping[str, int]) -> int:
        """An upper bound of a video's tokens: the unreduced one.

        vLLM bounds a Qwen3-VL video by one temporal slice at the whole video pixel budget, which
        holds for unreduced tokens (a video's slices share that budget) but not for a reduced count
        per slice (`slices x budget`). The unreduced bound holds for both, since a slice never gets
        more than its merged tokens; it sizes the encoder cache, not the prompt.
        """
        self.__dict__["_visionzip_unreduced"] = True
        try:
            return super().get_max_video_tokens(seq_len, mm_counts)
        finally:
            del self.__dict__["_visionzip_unreduced"]


def shrink_video_runs(input_ids: list[int], video_token_id: int, grids: torch.Tensor, reduced: list[int]) -> list[int]:
    """`input_ids` with every video slice's run of `video_token_id` cut to its video's `reduced` count.

    Runs appear in video order, `grids[v][0]` runs for video v; everything else (timestamps, vision
    markers, text) is kept.
    """
    per_run = [count for grid, count in zip(grids.tolist(), reduced, strict=True) for _ in range(int(grid[0]))]
    out: list[int] = []
    run = 0
    index = 0
    while index < len(input_ids):
        if input_ids[index] != video_token_id:
            out.append(input_ids[index])
            index += 1
            continue
        end = index
        while end < len(input_ids) and input_ids[end] == video_token_id:
            end += 1
        if run >= len(per_run):
            raise ValueError(f"the prompt has more video runs than the {len(per_run)} temporal slices of its videos")
        out.extend([video_token_id] * per_run[run])
        run, index = run + 1, end
    if run != len(per_run):
        raise ValueError(f"the prompt has {run} video runs for {len(per_run)} temporal slices of its videos")
    return out


class VisionZipQwen3VLMultiModalProcessor(Qwen3VLMultiModalProcessor):
    def _reduced_per_slice(self, grid: Any) -> int:
        frames, height, width = (int(v) for v in grid)
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)
        return self.info.visionzip_budget().item_tokens(height * width // merge**2, frames) // frames

    def _apply_hf_processor_main(self, mm_items: Any, hf_kwargs: Mapping[str, object]) -> Any:
        processed = super()._apply_hf_processor_main(mm_items, hf_kwargs)
        grids = processed.get("video_grid_thw")
        if grids is None or "input_ids" not in processed:
            return processed
        video_token_id = int(self.info.get_hf_config().video_token_id)
        reduced = [self._reduced_per_slice(grid) for grid in grids]
        rows = processed["input_ids"]
        rows = rows.tolist() if isinstance(rows, torch.Tensor) else rows
        processed["input_ids"] = [shrink_video_runs(list(row), video_token_id, grids, reduced) for row in rows]
        return processed

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, Any], out_mm_kwargs: Any) -> Any:
        hf_config = self.info.get_hf_config()
        tokenizer = self.info.get_tokenizer()
        merge = int(hf_config.vision_config.spatial_merge_size)
        budget = self.info.visionzip_budget()

        def image(item_idx: int) -> list[int]:
            _, height, width = out_mm_kwargs["image"][item_idx]["image_grid_thw"].data.tolist()
            return [int(hf_config.image_token_id)] * budget.item_tokens(height * width // merge**2)

        def video(item_idx: int) -> Any:
            item = out_mm_kwargs["video"][item_idx]
            grid = item["video_grid_thw"].data
            return Qwen3VLMultiModalProcessor.get_video_repl(
                tokens_per_frame=[self._reduced_per_slice(grid)] * int(grid[0]),
                timestamps=item["timestamps"].data,
                tokenizer=tokenizer,
                vision_start_token_id=hf_config.vision_start_token_id,
                vision_end_token_id=hf_config.vision_end_token_id,
                video_token_id=hf_config.video_token_id,
                select_token_id=True,
            )

        replacements = {"image": image, "video": video}
        return [
            dataclasses.replace(update, replacement=replacements[update.modality])
            for update in super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        ]


@MULTIMODAL_REGISTRY.register_processor(
    VisionZipQwen3VLMultiModalProcessor,
    info=VisionZipQwen3VLProcessingInfo,
    dummy_inputs=Qwen3VLDummyInputsBuilder,
)
class VisionZipQwen3VLForConditionalGeneration(VisionZipQwenMixin, Qwen3VLForConditionalGeneration):
    """vLLM's Qwen3-VL with VisionZip in the image and video path (deepstack features reduced alike)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "model") -> None:
        budget = self._init_visionzip(vllm_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._finish_init(budget)

    def scoring_attention(self) -> nn.Module:
        return self.visual.blocks[-1].attn

    def video_t_factors(self, inputs: Mapping[str, Any], count: int) -> list[float]:
        # Every temporal slice is its own run, positioned like an image: no time axis inside a run.
        return [0.0] * count

    def position_items(self, input_tokens: list[int], mm_features: list[Any]) -> list[PositionItem]:
        items: list[PositionItem] = []
        merge = int(self.config.vision_config.spatial_merge_size)
        for feature in sorted(mm_features, key=lambda f: f.mm_position.offset):
            if feature.modality == "image":
                _, height, width = feature.data["image_grid_thw"].data.tolist()
                offset, length = feature.mm_position.offset, feature.mm_position.length
                items.append((offset, 1, height // merge, width // merge, 0.0, length))
                continue
            # vLLM's own walk over a video's slices: (first video token, rows, cols, tokens) per run.
            for offset, rows, cols, length in Qwen3VLForConditionalGeneration._iter_mm_grid_hw(
                input_tokens,
                [feature],
                video_token_id=self.config.video_token_id,
                vision_start_token_id=self.config.vision_start_token_id,
                vision_end_token_id=self.config.vision_end_token_id,
                spatial_merge_size=merge,
            ):
                items.append((offset, 1, rows, cols, 0.0, length))
        return items
