"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP tower (no [CLS]), patches average-pooled to soft tokens.

The model runs SigLIP on one square image (896 px / patch 14 = 64 x 64 = 4096 patches), takes the
last hidden state (post-layernorm), average-pools it to `mm_tokens_per_image` soft tokens (16 x 16 =
256 with a 4 x 4 kernel), normalises (RMSNorm) and projects them. The language model sees the 256
soft tokens, so VisionZip selects among those:

- features: the feature layer's output (the last layer by default, with SigLIP's post-layernorm, as
  the model takes it), pooled by the projector's own `AvgPool2d`;
- scores: SigLIP has no [CLS] row, so a patch scores the attention it receives in the feature layer
  (averaged over all queries, summed over heads, `probe.received_attention`), and a soft token scores
  the mean of its patches' scores: the same average pooling as the features (a sum would rank alike);
- keys: the feature layer's keys averaged over heads, pooled the same way.

The method (VisionZip: top `dominant` soft tokens by score, the rest merged into `contextual` ones by
key similarity) runs on the pooled vision features, before the projector's normalisation and
projection, as the paper merges vision features before its projector; both steps are per token, so a
dominant token is exactly the model's own soft token at its slot.

Each image sends `dominant + contextual` tokens: its dominant soft tokens in raster order, then its
contextual tokens. `<start_of_image>` and `<end_of_image>` stay in the text around the shortened run;
`token_type_ids` (image tokens attend to each other bidirectionally) shrink with the placeholders, so
the reduced tokens of one image still form one bidirectional block. Pan-and-scan crops are separate
placeholder runs of `mm_tokens_per_image` tokens: each is reduced like an image.

Original positions (`positions="original"`): soft token i held placeholder i of its image's run, so a
reduced token takes the position of its anchor soft token (`core.anchor_indices`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from vlmzip._validation import budget_error
from vlmzip.adapters.base import Adapter, EncodedImages, check_square_batch, reduction_list
from vlmzip.adapters.parts import TowerAndProjector
from vlmzip.core import Reduction
from vlmzip.probe import ProbeOutput


class Gemma3Adapter(TowerAndProjector, Adapter):
    families = ("Gemma3ForConditionalGeneration",)
    image_input_keys = ("pixel_values",)
    supports_original_positions = True
    supports_adaptive = True

    # --- model parts (vision_tower, projector: TowerAndProjector) ---------------------------
    def resolve_feature_layer(self, layer: int | None) -> int:
        if layer is None:
            layer = -1  # the model projects SigLIP's last hidden state
        self.tower_info.feature_layer_index(layer)  # raises when out of range
        return layer

    @property
    def patch_side(self) -> int:
        """Patches per side of the square image the projector expects."""
        return int(self.projector().patches_per_image)

    @property
    def soft_token_side(self) -> int:
        return int(self.projector().tokens_per_side)

    def tokens_per_unit(self) -> int:
        return self.soft_token_side**2

    def check_budget(self) -> None:
        available = self.tokens_per_unit()
        if self.config.fewest_tokens > available:
            side, patches = self.soft_token_side, self.patch_side
            raise budget_error(
                self.config,
                available,
                f" (the soft tokens this model gives each image: {side} x {side} pooled from {patches} x {patches} "
                "patches)",
            )

    def budget_unit_tokens(self, inputs: Mapping[str, Any]) -> int:
        return self.tokens_per_unit()

    def full_counts(self, inputs: Mapping[str, Any]) -> list[int]:
        pixel_values = inputs["pixel_values"]
        side = self.patch_side * self.tower_info.patch_size
        check_square_batch(pixel_values, side, "images")
        return [self.tokens_per_unit()] * pixel_values.shape[0]

    # --- encoding ------------------------------------------------------------------------
    def _pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, patches, C) -> (B, soft tokens, C) with the projector's own average pooling, raster order."""
        batch, _, channels = tokens.shape
        side = self.patch_side
        grid = tokens.transpose(1, 2).reshape(batch, channels, side, side)
        return self.projector().avg_pool(grid).flatten(2).transpose(1, 2)

    def _is_last_layer(self) -> bool:
        return self.tower_info.feature_layer_index(self.feature_layer) == len(self.tower_info.layers) - 1

    def pooled_probe(self, pixel_values: torch.Tensor) -> ProbeOutput:
        """The feature layer of every image, pooled to the soft-token grid (features, scores and keys alike)."""
        tower = self.vision_tower()
        probe = self.probe_tower(pixel_values.to(tower.dtype))
        features = probe.features
        if self._is_last_layer():
            features = getattr(tower, "vision_model", tower).post_layernorm(features)
        side = self.soft_token_side
        return ProbeOutput(
            features=self._pool(features),
            scores=self._pool(probe.scores.unsqueeze(-1)).squeeze(-1),
            keys=self._pool(probe.keys),
            has_cls=False,
            num_prefix_tokens=0,
            grid=(side, side),
        )

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        """The projector after its pooling: RMSNorm, then the input projection (both per token)."""
        projector = self.projector()
        normed = projector.mm_soft_emb_norm(pooled)
        return torch.matmul(normed, projector.mm_input_projection_weight).type_as(pooled)

    @property
    def token_pixels(self) -> int:
        return self.tower_info.patch_size * self.patch_side // self.soft_token_side  # a soft token's pixels

    def reduce(
        self, pixel_values: torch.Tensor, **tower_kwargs: Any
    ) -> tuple[ProbeOutput, Reduction | list[Reduction]]:
        """The pooled probe of a batch of images and the method's reduction of it (soft-token grid; one
        reduction per image with an adaptive budget, see `Adapter.run_method`)."""
        probe = self.pooled_probe(pixel_values)
        return probe, self.run_method(probe)

    def encode(self, inputs: Mapping[str, Any]) -> EncodedImages:
        full_counts = self.full_counts(inputs)
        _, reduced = self.reduce(inputs["pixel_values"])
        reductions = reduction_list(reduced)  # adaptive budget: one per image, of its own length
        features = [image for reduction in reductions for image in self.project(reduction.features).unbind(0)]
        return EncodedImages(
            features=features,
            full_counts=full_counts,
            reductions=reductions,
            positions=self.anchor_rows(reductions),  # soft token i holds placeholder i
        )

    def attach_features(self, prepared: dict[str, Any], encoded: EncodedImages) -> None:
        # Gemma 3 takes one (images, tokens, hidden) tensor. Images of different lengths (adaptive budgets)
        # go as one item per token, (tokens, 1, hidden): the model scatters them in order, and generate()
        # regroups them per sample (beam search) by counting placeholders.
        features = encoded.features
        if len({feature.shape[0] for feature in features}) > 1:
            pooled = torch.cat(features).unsqueeze(1)
        else:
            pooled = torch.stack(features) if features else None
        prepared["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=pooled)}


__all__ = ["Gemma3Adapter"]
