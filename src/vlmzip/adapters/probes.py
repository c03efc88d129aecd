"""The adapter's "reduce from these probe outputs" seams: `adapter.probes_from(source)` and
`adapter.reductions_from(source)`.

Inside the context, every place the adapter would run the vision tower up to its feature layer
(`probe_tower`) takes the probe from `source` instead, so `prepare()` (and everything built on it)
reduces, projects and rewrites the sequence exactly as with the tower, without running it: a tool
that cached the probes of its images (a fine-tuning run over many epochs) serves them back here.
`reductions_from` goes one step further for tools that cached the method's output itself: `reduce()`
returns the source's reduction (and no probe), so only projection and sequence rewriting run. The
state lives on the adapter instance and is cleared on exit; nothing is patched.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import torch

from vlmzip.core import Reduction
from vlmzip.probe import ProbeOutput, probe_vision_tower

ProbeSource = ProbeOutput | Callable[[torch.Tensor], ProbeOutput]
ReductionSource = Callable[[torch.Tensor], Reduction]


class ProbeSourcing:
    """Mixin of `Adapter`: `probe_tower` and the `probes_from` context around it."""

    # Families whose towers are probed through `probe_tower` (the Qwen and Mistral 3 towers have probes
    # of their own, per image, and do not take probes from outside).
    serves_probes: ClassVar[bool] = True
    _probe_source: ProbeSource | None = None
    _probe_cursor: int = 0
    _reduction_source: ReductionSource | None = None

    @contextmanager
    def reductions_from(self, source: ReductionSource) -> Iterator[None]:
        """Inside the context, `reduce(pixel_values)` returns `(None, source(pixel_values))`: no tower, no method.

        source: a callable answering each call with the `Reduction` of those tower inputs (one row per
            row of pixel_values), e.g. a cache a tool filled from earlier `reduce()` results. Families
            whose `encode()` needs the probe too (multi-crop layouts, per-image probes) refuse it with
            an error when it is used; compare `prepare()` with and without the source before relying on it.
        """
        if not callable(source):
            raise TypeError(f"source must be a callable pixel_values -> Reduction, got {type(source).__name__}")
        if self._reduction_source is not None:
            raise ValueError("reductions_from is already active on this adapter")
        self._reduction_source = source
        try:
            yield
        finally:
            self._reduction_source = None

    def reduction_from_source(self, pixel_values: torch.Tensor) -> Reduction | None:
        """The active `reductions_from` source's answer for these tower inputs, or None without one."""
        source = self._reduction_source
        if source is None:
            return None
        reduction = source(pixel_values)
        if not isinstance(reduction, Reduction) or reduction.features.shape[0] != pixel_values.shape[0]:
            raise ValueError(f"reductions_from: the source must return a Reduction of {pixel_values.shape[0]} rows")
        return reduction

    @contextmanager
    def probes_from(self, source: ProbeSource) -> Iterator[None]:
        """Reduce from `source` instead of running the tower, inside the context.

        source: a `ProbeOutput` whose rows are the tower units (images, crops, tiles, frames) of the
            calls made inside the context, in the order the adapter probes them (e.g. `ProbeOutput.cat`
            of the probes a tool kept, one row per unit); each probe takes the next rows. Or a
            callable `pixel_values -> ProbeOutput` answering each probe (one row per row of pixel_values).
        """
        if not self.serves_probes:
            raise ValueError(f"probes_from is not supported for {type(self).__name__}: its tower has its own probe")
        if not isinstance(source, ProbeOutput) and not callable(source):
            raise TypeError(f"source must be a ProbeOutput or a callable, got {type(source).__name__}")
        if self._probe_source is not None:
            raise ValueError("probes_from is already active on this adapter")
        self._probe_source, self._probe_cursor = source, 0
        try:
            yield
        finally:
            self._probe_source, self._probe_cursor = None, 0

    def probe_tower(self, pixel_values: torch.Tensor, **tower_kwargs: Any) -> ProbeOutput:
        """The feature layer's probe of these tower inputs: from `probes_from`'s source when one is active,
        else by running the tower (`probe_vision_tower`)."""
        source = self._probe_source
        if source is None:
            return probe_vision_tower(self.vision_tower(), pixel_values, self.feature_layer, **tower_kwargs)
        count = int(pixel_values.shape[0])
        if isinstance(source, ProbeOutput):
            start, available = self._probe_cursor, int(source.features.shape[0])
            if start + count > available:
                raise ValueError(
                    f"probes_from: the source holds {available} rows, but the tower units probed so far need "
                    f"{start + count}"
                )
            probe = source[start : start + count]
            self._probe_cursor = start + count
        else:
            probe = source(pixel_values)
            if not isinstance(probe, ProbeOutput) or probe.features.shape[0] != count:
                raise ValueError(f"probes_from: the source must return a ProbeOutput of {count} rows")
        expected = self.tower_info.num_tokens(*pixel_values.shape[-2:]) if pixel_values.ndim >= 4 else None
        if expected is not None and probe.features.shape[1] != expected:
            raise ValueError(
                f"probes_from: the source's probes hold {probe.features.shape[1]} tokens per unit, the tower "
                f"yields {expected} for these pixel_values"
            )
        return probe.to(pixel_values.device)
