"""One measured pipeline run per variant, interleaved and repeated: `vlmzip bench`'s engine.

Every run goes from the processor's tensors (pixels + token ids) to a fixed number of generated
tokens through the model's own `generate()`, with timestamps taken by hooks along the way:

  start ── tower done ── [selection] ── language model starts ── first-token logits ── last token
  tower_ms = tower done - start;  select_ms = the reduction method alone (0 for full and FastV);
  llm_prefill_ms = first-token logits - language model starts (features ready -> first logits);
  ttft_ms = first-token logits - start;  e2e_ms = last token - start;
  decode_tok_s = generated tokens after the first / (last token - first-token logits).

Every stamp also records the process's CPU time (all threads): on a shared CPU machine the `*_cpu_ms`
twins of the timings count the work done, unaffected by other processes competing for the cores
(on CUDA they count host work only). On CUDA every timestamp synchronises the device first.
Peak memory is the CUDA allocator peak, or the sampled process RSS on CPU (`bench.memory.PeakMemory`);
the KV cache is measured on the cache object generate() returns; FLOPs are counted from the shapes
that actually ran.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import LogitsProcessor, LogitsProcessorList

from vlmzip.adapters import geometry_of
from vlmzip.bench.flops import FlopCounter, projector_modules
from vlmzip.cache import ImageCache
from vlmzip.compat import output_cache
from vlmzip.config import VisionZipConfig, check_int
from vlmzip.measure import PeakMemory, kv_cache_bytes_after_prefill
from vlmzip.model_parts import language_model_of
from vlmzip.variants import Variant, VariantRunner, unit_tokens

# Per-run quantities; each is reported as median, min and max over the repeats.
TIMED_METRICS = (
    "tower_ms",
    "select_ms",
    "llm_prefill_ms",
    "ttft_ms",
    "e2e_ms",
    "decode_tok_s",
    "peak_mem_mb",
    "tower_cpu_ms",
    "llm_prefill_cpu_ms",
    "ttft_cpu_ms",
    "e2e_cpu_ms",
)
# With follow-up questions on the same images (`followups`): medians over the later questions of a run.
LATER_METRICS = ("ttft_later_ms", "llm_prefill_later_ms", "tower_later_ms")
# Quantities that do not vary between runs (taken from the last one).
FIXED_METRICS = (
    "tokens",
    "tokens_std",
    "tokens_min",
    "tokens_max",
    "prompt_tokens",
    "llm_tokens",
    "kv_cache_mb",
    "tower_gflops",
    "llm_prefill_gflops",
)


@dataclass
class RunMeasurement:
    tower_ms: float
    select_ms: float
    llm_prefill_ms: float
    ttft_ms: float
    e2e_ms: float
    tower_cpu_ms: float
    llm_prefill_cpu_ms: float
    ttft_cpu_ms: float
    e2e_cpu_ms: float
    decode_tok_s: float
    peak_mem_mb: float
    peak_mem_delta_mb: float
    tokens: float  # visual tokens per sample that the language model keeps (after layer K for FastV), batch mean
    tokens_std: float  # their spread over the batch (adaptive budgets give images different counts)
    tokens_min: int
    tokens_max: int
    prompt_tokens: float  # sequence length entering the language model, mean over the batch
    llm_tokens: float  # sequence length averaged over the decoder layers (differs from prompt_tokens for FastV)
    kv_cache_mb: float | None  # KV cache after the prefill, whole batch
    tower_gflops: float
    llm_prefill_gflops: float
    ttft_later_ms: float | None = None  # later questions on the same images (the image cache's hits)
    llm_prefill_later_ms: float | None = None
    tower_later_ms: float | None = None


@dataclass
class VariantResult:
    variant: Variant
    runs: list[RunMeasurement] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # settings worth reporting, e.g. FastV's layer

    def median(self, metric: str) -> float:
        return statistics.median(getattr(run, metric) for run in self.runs)

    def summary(self) -> dict[str, Any]:
        variant = self.variant
        row: dict[str, Any] = {"method": variant.method, "budget": variant.budget, "positions": variant.positions}
        row["attention_mass"] = variant.attention_mass
        last = self.runs[-1]
        for metric in FIXED_METRICS:
            row[metric] = getattr(last, metric)
        for metric in (*TIMED_METRICS, "peak_mem_delta_mb"):
            values = [getattr(run, metric) for run in self.runs]
            row[metric] = statistics.median(values)
            row[f"{metric}_min"], row[f"{metric}_max"] = min(values), max(values)
        for metric in LATER_METRICS:
            values = [getattr(run, metric) for run in self.runs]
            present = [value for value in values if value is not None]
            row[metric] = statistics.median(present) if present else None
        row["repeats"] = len(self.runs)
        row.update(self.extra)
        return row


def with_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add each row's ratios to the full-token row (the first one): speedups for times, ratios for sizes."""
    base = rows[0]

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        if numerator is None or denominator is None or denominator == 0:
            return None
        return numerator / denominator

    for row in rows:
        for metric in ("tower_ms", "llm_prefill_ms", "ttft_ms", "e2e_ms"):
            row[f"speedup_{metric[:-3]}"] = ratio(base[metric], row[metric])
            cpu_metric = metric.replace("_ms", "_cpu_ms")
            row[f"speedup_{cpu_metric[:-3]}"] = ratio(base[cpu_metric], row[cpu_metric])
        row["speedup_decode"] = ratio(row["decode_tok_s"], base["decode_tok_s"])
        row["mem_ratio"] = ratio(row["peak_mem_mb"], base["peak_mem_mb"])
        row["kv_ratio"] = ratio(row["kv_cache_mb"], base["kv_cache_mb"])
        row["tower_flops_ratio"] = ratio(row["tower_gflops"], base["tower_gflops"])
        row["llm_flops_ratio"] = ratio(row["llm_prefill_gflops"], base["llm_prefill_gflops"])
        # The speedup a prefill proportional to sequence length would give: the "ideal" one.
        row["ideal_speedup_llm_prefill"] = ratio(base["llm_tokens"], row["llm_tokens"])
        row["speedup_ttft_later"] = ratio(base["ttft_ms"], row.get("ttft_later_ms"))
        # A later question should cost the reduced prefill only: its TTFT over that run's prefill.
        row["ttft_later_over_prefill"] = ratio(row.get("ttft_later_ms"), row.get("llm_prefill_later_ms"))
    return rows


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so each run's RSS peak starts from live memory only."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


class _Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class _FirstLogits(LogitsProcessor):
    """Stamps the moment the first-token logits exist (generate calls processors once per step)."""

    def __init__(self, stamp: Callable[[str], None]) -> None:
        self.stamp = stamp

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.stamp("first_logits")
        return scores


class PipelineBench:
    """Measures variants of one model on one batch of processor outputs."""

    def __init__(
        self,
        model: nn.Module,
        inputs: Mapping[str, Any],
        variants: Sequence[Variant],
        *,
        new_tokens: int = 16,
        pad_token_id: int | None = None,
        followups: Sequence[Mapping[str, Any]] = (),
        cache_bytes: int = 2**30,
    ) -> None:
        self.model = model
        self.inputs = inputs
        # Other questions on the same images: reduced variants answer them from an ImageCache that
        # the first question filled (a fresh cache every run), the full-token model does not run them.
        self.followups = list(followups)
        self.cache_bytes = check_int("cache_bytes", cache_bytes, 1)
        self.new_tokens = check_int("new_tokens", new_tokens, 1)
        self.device = next(model.parameters()).device
        self.clock = _Clock(self.device)
        reference = geometry_of(model)
        self.vision_tower = reference.vision_tower()
        self.image_token_ids = reference.placeholder_token_ids
        input_ids = inputs["input_ids"]
        image_tokens = int(torch.isin(input_ids[0], torch.tensor(self.image_token_ids, device=input_ids.device)).sum())
        if image_tokens == 0:
            raise ValueError("inputs: the first sample holds no image placeholder tokens; nothing to reduce")
        tokens = unit_tokens(model, inputs) if VariantRunner.needs_unit_tokens(variants) else None
        self.runners = {variant: VariantRunner(model, variant, tokens) for variant in variants}
        language_model = language_model_of(model)
        self.language_model = language_model
        self.flops = FlopCounter(
            reference.tower_info.layers,
            language_model.layers,
            projector=projector_modules(model, self.vision_tower),
            head=model.get_output_embeddings(),
        )
        if pad_token_id is None:
            pad_token_id = getattr(getattr(model, "generation_config", None), "pad_token_id", None)
        self.pad_token_id = pad_token_id

    def _count_visual(self, input_ids: torch.Tensor) -> list[int]:
        """Visual tokens of every sample."""
        ids = torch.tensor(self.image_token_ids, device=input_ids.device)
        return torch.isin(input_ids, ids).sum(dim=1).tolist()

    def run_once(self, variant: Variant) -> RunMeasurement:
        runner = self.runners[variant]
        if not self.followups or runner.adapter is None:
            return self._measure(runner, self.inputs, None)
        cache = ImageCache(max_bytes=self.cache_bytes)
        first = self._measure(runner, self.inputs, cache)
        later = [self._measure(runner, inputs, cache) for inputs in self.followups]
        expected_hits = sum(len(runner.adapter.full_counts(inputs)) for inputs in self.followups)
        if cache.hits != expected_hits:
            raise RuntimeError(f"{variant.label}: {cache.hits} image cache hits, expected {expected_hits}")
        first.ttft_later_ms = statistics.median(run.ttft_ms for run in later)
        first.llm_prefill_later_ms = statistics.median(run.llm_prefill_ms for run in later)
        first.tower_later_ms = statistics.median(run.tower_ms for run in later)
        return first

    def _measure(self, runner: VariantRunner, inputs: Mapping[str, Any], cache: ImageCache | None) -> RunMeasurement:
        stamps: dict[str, float] = {}
        cpu: dict[str, float] = {}

        def stamp(name: str) -> None:
            if name not in stamps:
                stamps[name] = self.clock.now()
                cpu[name] = time.process_time()

        handles = [
            self.vision_tower.register_forward_hook(lambda *args: stamp("tower_end")),
            self.language_model.register_forward_pre_hook(lambda *args: stamp("llm_start")),
        ]
        adapter = runner.adapter
        if adapter is not None:
            method = adapter.method

            def timed_method(probe: Any, config: VisionZipConfig) -> Any:
                stamp("select_start")
                reduction = method(probe, config)
                stamp("select_end")
                return reduction

            adapter.method = timed_method
        if self.device.type == "cpu":
            _trim_heap()
        try:
            with torch.inference_mode(), PeakMemory(self.device, interval=0.005) as memory, self.flops as counter:
                stamp("start")
                prepared = runner.prepare(inputs, cache=cache)
                with runner.generating():
                    output = self.model.generate(
                        **prepared,
                        max_new_tokens=self.new_tokens,
                        min_new_tokens=self.new_tokens,
                        do_sample=False,
                        num_beams=1,
                        logits_processor=LogitsProcessorList([_FirstLogits(stamp)]),
                        return_dict_in_generate=True,
                        pad_token_id=self.pad_token_id,
                    )
                stamp("end")
        finally:
            for handle in handles:
                handle.remove()
            if adapter is not None:
                adapter.method = method

        # The probe stops inside the tower (its forward hook never fires): the method starting marks the end.
        tower_end = "select_start" if "select_start" in stamps else "tower_end" if "tower_end" in stamps else "start"

        def span(clock: dict[str, float], first: str, last: str) -> float:
            return (clock[last] - clock[first]) * 1e3

        batch = prepared["input_ids"].shape[0]
        decode_seconds = stamps["end"] - stamps["first_logits"]
        if runner.pruner is not None and runner.pruner.last_kept is not None:
            tokens = self._count_visual(prepared["input_ids"].gather(1, runner.pruner.last_kept))
        else:
            tokens = self._count_visual(prepared["input_ids"])
        kv_bytes = kv_cache_bytes_after_prefill(output_cache(output), self.new_tokens)
        lengths = counter.count.llm_layer_lengths
        spread = torch.tensor(tokens, dtype=torch.float64)
        return RunMeasurement(
            tower_ms=span(stamps, "start", tower_end),
            select_ms=span(stamps, "select_start", "select_end") if "select_end" in stamps else 0.0,
            llm_prefill_ms=span(stamps, "llm_start", "first_logits"),
            ttft_ms=span(stamps, "start", "first_logits"),
            e2e_ms=span(stamps, "start", "end"),
            tower_cpu_ms=span(cpu, "start", tower_end),
            llm_prefill_cpu_ms=span(cpu, "llm_start", "first_logits"),
            ttft_cpu_ms=span(cpu, "start", "first_logits"),
            e2e_cpu_ms=span(cpu, "start", "end"),
            decode_tok_s=batch * (self.new_tokens - 1) / decode_seconds if self.new_tokens > 1 else 0.0,
            peak_mem_mb=memory.peak_mb,
            peak_mem_delta_mb=memory.delta_mb,
            tokens=tokens[0] if min(tokens) == max(tokens) else float(spread.mean()),
            tokens_std=float(spread.std(unbiased=False)),
            tokens_min=min(tokens),
            tokens_max=max(tokens),
            prompt_tokens=float(prepared["attention_mask"].sum(dim=1).float().mean()),
            llm_tokens=sum(lengths) / len(lengths) if lengths else 0.0,
            kv_cache_mb=kv_bytes / 2**20 if kv_bytes is not None else None,
            tower_gflops=counter.count.tower_gflops,
            llm_prefill_gflops=counter.count.llm_prefill_gflops,
        )

    def run(
        self, *, repeats: int = 3, warmup: int = 1, progress: Callable[[Variant], None] | None = None
    ) -> list[VariantResult]:
        """Run every variant `warmup + repeats` times, rotating the order each round; warm-up runs are dropped."""
        repeats = check_int("repeats", repeats, 1)
        warmup = check_int("warmup", warmup, 0)
        variants = list(self.runners)
        results = {variant: VariantResult(variant) for variant in variants}
        for variant, runner in self.runners.items():
            if runner.pruner is not None:
                results[variant].extra[f"{variant.method}_layer"] = runner.pruner.layer
        for round_index in range(warmup + repeats):
            shift = round_index % len(variants)
            for variant in variants[shift:] + variants[:shift]:
                measurement = self.run_once(variant)
                if round_index >= warmup:
                    results[variant].runs.append(measurement)
                if progress is not None:
                    progress(variant)
        return [results[variant] for variant in variants]
