"""Where most families keep their vision parts: `model.model.vision_tower` and `model.model.multi_modal_projector`."""

from __future__ import annotations

from torch import nn


class TowerAndProjector:
    """Adapter mixin for the families whose inner model holds `vision_tower` and `multi_modal_projector`
    (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Gemma 3, InternVL, Mistral 3). List it before `Adapter`."""

    model: nn.Module

    def vision_tower(self) -> nn.Module:
        return self.model.model.vision_tower

    def projector(self) -> nn.Module:
        return self.model.model.multi_modal_projector
