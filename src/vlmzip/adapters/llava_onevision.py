"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP tower (no [CLS]), images and videos.

Images: as LLaVA-NeXT (`anyres_layout`): every crop reduced alike with tokens ranked by the attention
they receive (SigLIP has no [CLS] row); the base crop's tokens, then the grid crops' dominant tokens
row-major over the stitched grid, then their contextual tokens. No unpadding, no newline tokens and
no "anyres_max" downscaling. Images of a multi-image sample are single crops (the model does not
split them), so they send `dominant + contextual` tokens each.

Videos: the model projects each frame's tokens, bilinearly pools them 2x2 (27 x 27 -> 14 x 14 for
384 px frames) and appends one newline token per video; the placeholders count pooled tokens. So the
reduction runs on the pooled grid: features are the model's own pooled projected tokens, and scores
and keys are pooled by the same interpolation, so that selection happens on the tokens the LLM sees.
Each frame keeps `dominant + contextual` of them (at most the pooled count); the newline stays. The
optional temporal step (`VisionZipConfig.temporal_threshold`, see `vlmzip.video`) then drops
dominant tokens that repeat the previous frame. With budget_scope="per_image", the budget is the
total of one video, split evenly over its frames.

Reduced videos travel to the model as images: the model's video path concatenates equal-length
videos only, while its image path takes one tensor per item. `prepare()` therefore turns the video
placeholders into image placeholders in `input_ids`; sequences returned by `generate()` show the
image token there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from vlmzip._validation import budget_error
from vlmzip.adapters.base import EncodedImages, placeholder_order
from vlmzip.adapters.cached import units_input_ids
from vlmzip.adapters.llava_next import LlavaNextAdapter
from vlmzip.cache import VisualUnit
from vlmzip.core import Reduction, anchor_indices
from vlmzip.probe import ProbeOutput, resolve_tower
from vlmzip.video import temporal_keep_mask

IMAGE, VIDEO = "image", "video"


class LlavaOnevisionAdapter(LlavaNextAdapter):
    families = ("LlavaOnevisionForConditionalGeneration",)
    image_input_keys = ("pixel_values", "pixel_values_videos")
    feature_select_strategy = "full"
    takes_videos = True

    def check_model(self) -> None:
        super().check_model()
        tower = self.model.model.vision_tower
        if resolve_tower(tower).num_prefix_tokens:  # the model's video pooling assumes a square patch grid
            raise ValueError(
                f"model: LLaVA-OneVision needs a vision tower without [CLS] or register tokens (SigLIP), "
                f"got {type(tower).__name__}"
            )

    @property
    def video_token_id(self) -> int:
        return int(self.model.config.video_token_id)

    @property
    def placeholder_token_ids(self) -> tuple[int, ...]:
        return (self.image_token_id, self.video_token_id)

    @property
    def pooled_grid(self) -> tuple[int, int]:
        """Tokens per frame side after the model's 2x2 bilinear pooling (ceil of half the patch grid)."""
        rows, cols = self.patch_grid
        return math.ceil(rows / 2), math.ceil(cols / 2)

    def crop_count_range(self) -> tuple[int, int]:
        _, most = super().crop_count_range()
        return 1, most  # images of multi-image samples are not split

    # --- images ----------------------------------------------------------------------------
    def image_crop_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        counts = super().image_crop_counts(inputs)
        batch_num_images = inputs.get("batch_num_images")
        if batch_num_images is None:
            return counts  # the model then treats every image as a single-image sample
        per_sample = [int(n) for n in batch_num_images]
        if sum(per_sample) != len(counts):
            raise ValueError(
                f"inputs['batch_num_images'] counts {sum(per_sample)} images but image_sizes has {len(counts)}"
            )
        single = [n == 1 for n in per_sample for _ in range(n)]
        return [count if is_single else 1 for count, is_single in zip(counts, single, strict=True)]

    def packed_length(self, crops: int, image_size: tuple[int, int]) -> int:
        rows, cols = self.patch_grid
        return int(self.pack_dummy(torch.zeros(crops, rows * cols, 1), image_size).shape[0])

    def pack_dummy(self, dummy: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        packed, _ = self.model.model.pack_image_features(
            [dummy],
            [list(image_size)],
            image_newline=torch.zeros(dummy.shape[-1]),
            vision_aspect_ratio=self.model.config.vision_aspect_ratio,
        )
        return packed[0] if isinstance(packed, (list, tuple)) else packed  # one image: its packed features

    # --- videos ----------------------------------------------------------------------------
    def video_frames(self, inputs: Mapping[str, Any]) -> torch.Tensor:
        videos = inputs["pixel_values_videos"]
        if not isinstance(videos, torch.Tensor) or videos.ndim != 5:
            raise ValueError(
                "inputs['pixel_values_videos'] must be a (videos, frames, channels, height, width) tensor, got "
                f"{getattr(videos, 'shape', type(videos).__name__)}"
            )
        return videos

    def video_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        videos = self.video_frames(inputs)
        rows, cols = self.pooled_grid
        return [videos.shape[1] * rows * cols + 1] * videos.shape[0]  # + the newline after each video

    def pooled_probe(self, videos: torch.Tensor) -> ProbeOutput:
        """The feature layer of every frame, projected and pooled as the model pools video frames."""
        probe = self.probe_tower(videos.flatten(0, 1))
        pool = self.model.model.apply_pooling  # bilinear, on any (frames, tokens, channels) tensor
        return ProbeOutput(
            features=pool(self.projector()(probe.features)),
            scores=pool(probe.scores.unsqueeze(-1)).squeeze(-1),
            keys=pool(probe.keys),
            has_cls=False,
            num_prefix_tokens=0,
            grid=self.pooled_grid,
        )

    def encode_videos(self, inputs: Mapping[str, Any]) -> EncodedImages:
        videos = self.video_frames(inputs)
        num_videos, frames = videos.shape[:2]
        rows, cols = self.pooled_grid
        config = self.config.per_unit(frames)
        if config.fewest_tokens > rows * cols:
            raise budget_error(config, rows * cols, " per video frame (the pooled tokens the model gives each frame)")
        probe = self.pooled_probe(videos)
        reduced = self.run_method(probe, config)
        units = reduced.split() if isinstance(reduced, Reduction) else reduced
        newline = self.model.model.image_newline.to(probe.features).unsqueeze(0)
        full_counts = self.video_counts(inputs)
        features, positions = [], []
        for video in range(num_videos):
            span = slice(video * frames, (video + 1) * frames)
            # Placeholder of each token: frame f's pooled token i is placeholder f * rows * cols + i.
            slots = [anchor_indices(unit)[0] + frame * rows * cols for frame, unit in enumerate(units[span])]
            if self.config.temporal_threshold is None:
                kept = torch.cat([unit.features[0] for unit in units[span]])
                kept_slots = torch.cat(slots)
            else:  # a fixed budget (adaptive budgets refuse temporal_threshold): frames are alike
                tokens = reduced.features[span]
                keep = temporal_keep_mask(
                    probe.features[span], reduced.kept_indices[span], tokens.shape[1], self.config.temporal_threshold
                )
                kept, kept_slots = tokens[keep], torch.stack(slots)[keep]
            features.append(torch.cat([kept, newline]))
            newline_slot = torch.tensor([full_counts[video] - 1], dtype=kept_slots.dtype, device=kept_slots.device)
            positions.append(torch.cat([kept_slots, newline_slot]))
        reductions = [reduced] if isinstance(reduced, Reduction) else units
        return EncodedImages(
            features=features,
            full_counts=full_counts,
            reductions=reductions,
            positions=positions if self.config.positions == "original" else None,
        )

    # --- both, in text order ---------------------------------------------------------------------
    def counts_by_kind(self, inputs: Mapping[str, Any]) -> dict[str, list[int]]:
        return {
            IMAGE: self.image_counts(inputs) if inputs.get("pixel_values") is not None else [],
            VIDEO: self.video_counts(inputs) if inputs.get("pixel_values_videos") is not None else [],
        }

    def text_order(self, inputs: Mapping[str, Any], counts: Mapping[str, list[int]]) -> list[tuple[str, int]]:
        """(kind, index) of every image and video in the order their placeholder runs appear in the text."""
        input_ids = inputs["input_ids"]
        attention_mask = inputs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kinds = {self.image_token_id: IMAGE, self.video_token_id: VIDEO}
        return placeholder_order(input_ids, attention_mask, kinds, counts)

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        counts = self.counts_by_kind(inputs)
        return [counts[kind][index] for kind, index in self.text_order(inputs, counts)]

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        encoded = {
            IMAGE: self.encode_images(inputs) if inputs.get("pixel_values") is not None else None,
            VIDEO: self.encode_videos(inputs) if inputs.get("pixel_values_videos") is not None else None,
        }
        counts = {kind: part.full_counts if part is not None else [] for kind, part in encoded.items()}
        order = self.text_order(inputs, counts)
        return EncodedImages(
            features=[encoded[kind].features[index] for kind, index in order],
            full_counts=[counts[kind][index] for kind, index in order],
            reductions=[r for part in encoded.values() if part is not None for r in part.reductions],
            positions=None
            if self.config.positions != "original"
            else [encoded[kind].positions[index] for kind, index in order],
        )

    def visual_units(self, inputs: Mapping[str, Any]) -> list[VisualUnit]:
        counts = self.counts_by_kind(inputs)
        units: dict[str, list[VisualUnit]] = {IMAGE: [], VIDEO: []}
        if inputs.get("pixel_values") is not None:
            units[IMAGE] = self.image_units(inputs)
        if inputs.get("pixel_values_videos") is not None:
            units[VIDEO] = [
                VisualUnit(VIDEO, (frames,), (frames.shape[0],), count, self.video_token_id)
                for frames, count in zip(self.video_frames(inputs), counts[VIDEO], strict=True)
            ]
        return [units[kind][index] for kind, index in self.text_order(inputs, counts)]

    def units_inputs(self, units: Sequence[VisualUnit]) -> dict[str, Any]:
        result = super().units_inputs(units)
        videos = [unit.tensors[0] for unit in units if unit.modality == VIDEO]
        if videos:
            result["pixel_values_videos"] = torch.stack(videos)
        result["input_ids"] = units_input_ids(units)
        return result

    def attach_features(self, prepared: dict[str, Any], encoded: EncodedImages) -> None:
        input_ids = prepared["input_ids"]
        prepared["input_ids"] = input_ids.masked_fill(input_ids == self.video_token_id, self.image_token_id)
        super().attach_features(prepared, encoded)
