"""What `bench` and `demo` measure with: wall time of a call, peak memory of a block of code (CUDA
allocator peak on GPU, sampled process RSS on CPU) and the KV cache a prefill leaves."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def current_rss_bytes() -> int:
    """Resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return 0


class PeakMemory:
    """Context manager measuring the peak memory used by its block, in MB.

    On CUDA: `torch.cuda.max_memory_allocated` after a reset (exact, tensors only).
    On CPU: process RSS sampled every `interval` seconds by a background thread; `peak_mb` is the
    highest RSS seen, `delta_mb` the rise above the RSS at entry (short spikes between samples can
    be missed, so treat it as a lower bound).
    """

    def __init__(self, device: torch.device | str = "cpu", interval: float = 0.001) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.peak_mb = 0.0
        self.delta_mb = 0.0
        self._start = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, current_rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            self._start = self._peak = current_rss_bytes()
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak = max(self._peak, current_rss_bytes())
        self.peak_mb = peak / 2**20
        self.delta_mb = max(0, peak - self._start) / 2**20


def kv_cache_bytes_after_prefill(cache: Any, generated: int) -> float | None:
    """Bytes of keys and values the cache held right after the prefill (before `generated - 1` decoding steps),
    plus the fixed-size states of linear-attention layers."""
    layers = getattr(cache, "layers", None)
    if not layers:
        return None
    total = 0.0
    for layer in layers:
        # Linear-attention layers (e.g. Qwen3.5's Gated DeltaNet) hold fixed-size states, whatever the length.
        states = [
            state
            for name in ("conv_states", "recurrent_states")
            for state in (getattr(layer, name, None) or {}).values()
            if isinstance(state, torch.Tensor)
        ]
        total += sum(state.nbytes for state in states)
        keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
        if states and not isinstance(keys, torch.Tensor):
            continue
        if not isinstance(keys, torch.Tensor) or not isinstance(values, torch.Tensor) or keys.ndim < 2:
            return None
        length = keys.shape[-2]
        prefill = length - (generated - 1)
        total += (keys.nbytes + values.nbytes) * prefill / max(1, length)
    return total


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    """`function()`'s result and its wall time in milliseconds."""
    start = time.perf_counter()
    result = function()
    return result, (time.perf_counter() - start) * 1e3
