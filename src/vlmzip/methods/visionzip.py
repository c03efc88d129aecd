"""VisionZip (dominant + contextual tokens) and its dominant-only ablation."""

from __future__ import annotations

from typing import TYPE_CHECKING

from vlmzip.core import Reduction, visionzip_reduce
from vlmzip.methods import register_method
from vlmzip.probe import ProbeOutput

if TYPE_CHECKING:
    from vlmzip.config import VisionZipConfig


@register_method("visionzip")
def visionzip(probe: ProbeOutput, config: VisionZipConfig) -> Reduction:
    return visionzip_reduce(
        probe.features,
        probe.scores,
        probe.keys,
        config.dominant,
        config.contextual,
        has_cls=probe.has_cls,
        merge=config.merge,
    )


@register_method("visionzip-dominant")
def visionzip_dominant(probe: ProbeOutput, config: VisionZipConfig) -> Reduction:
    """Same total budget, all of it spent on dominant tokens (no merging)."""
    return visionzip_reduce(
        probe.features, probe.scores, probe.keys, config.tokens, 0, has_cls=probe.has_cls, merge=config.merge
    )
