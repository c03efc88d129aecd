"""The bench engine on a tiny random LLaVA: what each row measures, and its ratios to all tokens."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llava, make_llava_processor, random_images
from vlmzip.bench.flops import FlopCounter, linear_weights
from vlmzip.bench.runner import PipelineBench, kv_cache_bytes_after_prefill, with_ratios
from vlmzip.variants import FULL, Variant, build_variants

PROMPT = "USER: <image> what is in the image ? ASSISTANT:"


@pytest.fixture(scope="module")
def model():
    model = make_llava()
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def inputs():
    return make_llava_processor()(images=random_images(2), text=[PROMPT] * 2, return_tensors="pt", padding=True)


@pytest.fixture(scope="module")
def rows(model, inputs):
    variants = [Variant(FULL), Variant("visionzip", 64), Variant("fastv", 64)]
    bench = PipelineBench(model, inputs, variants, new_tokens=3)
    results = bench.run(repeats=2, warmup=0)
    assert [len(result.runs) for result in results] == [2, 2, 2]
    return {row["method"]: row for row in with_ratios([result.summary() for result in results])}


def test_tokens_and_sequence_lengths(rows, inputs):
    prompt = inputs["input_ids"].shape[1]
    assert rows["full"]["tokens"] == 576 and rows["full"]["prompt_tokens"] == prompt
    assert rows["visionzip"]["tokens"] == 64 and rows["visionzip"]["prompt_tokens"] == prompt - 576 + 64
    # FastV: the first layer sees the full prompt, the second the pruned one (K = 1 on a 2-layer model).
    assert rows["fastv"]["tokens"] == 64 and rows["fastv"]["fastv_layer"] == 1
    assert rows["fastv"]["llm_tokens"] == (prompt + prompt - 576 + 64) / 2


def test_timings_are_consistent(rows):
    for row in rows.values():
        assert 0 < row["llm_prefill_ms"] < row["ttft_ms"] < row["e2e_ms"]
        assert row["tower_ms"] < row["ttft_ms"]
        assert row["decode_tok_s"] > 0 and row["peak_mem_mb"] > 0
        assert row["llm_prefill_ms_min"] <= row["llm_prefill_ms"] <= row["llm_prefill_ms_max"]
    assert rows["visionzip"]["select_ms"] > 0
    assert rows["full"]["select_ms"] == rows["fastv"]["select_ms"] == 0
    for row in rows.values():  # process CPU time, the load-independent twin of every timing
        assert 0 < row["llm_prefill_cpu_ms"] <= row["ttft_cpu_ms"] <= row["e2e_cpu_ms"]
        assert row["speedup_ttft_cpu"] == pytest.approx(rows["full"]["ttft_cpu_ms"] / row["ttft_cpu_ms"])


def test_kv_cache_and_ratios(rows, model):
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    per_token = 2 * text.num_key_value_heads * head_dim * 4  # keys and values, float32
    expected = 2 * text.num_hidden_layers * rows["full"]["prompt_tokens"] * per_token / 2**20  # batch of 2
    assert rows["full"]["kv_cache_mb"] == pytest.approx(expected)
    assert rows["visionzip"]["kv_ratio"] == pytest.approx(
        rows["visionzip"]["prompt_tokens"] / rows["full"]["prompt_tokens"]
    )
    full = rows["full"]
    assert all(full[key] == 1 for key in ("speedup_llm_prefill", "speedup_ttft", "kv_ratio", "llm_flops_ratio"))
    assert rows["visionzip"]["ideal_speedup_llm_prefill"] == pytest.approx(
        full["prompt_tokens"] / rows["visionzip"]["prompt_tokens"]
    )
    assert rows["visionzip"]["speedup_ttft"] == pytest.approx(full["ttft_ms"] / rows["visionzip"]["ttft_ms"])


def test_flops_count_what_ran(rows, model):
    tower = model.model.vision_tower.encoder.layers
    tokens, width = 577, model.config.vision_config.hidden_size
    per_layer = 2 * tokens * linear_weights(tower[0]) + 4 * tokens * tokens * width
    projector = 2 * linear_weights(model.model.multi_modal_projector)
    # All 4 tower layers run for the full model; the probe stops after layer -2 (3 layers).
    assert rows["full"]["tower_gflops"] * 1e9 == pytest.approx(2 * (4 * per_layer + 576 * projector))
    assert rows["visionzip"]["tower_gflops"] * 1e9 == pytest.approx(2 * (3 * per_layer + 64 * projector))
    decoder = model.model.language_model.layers[0]
    text_width = model.config.text_config.hidden_size
    head = 2 * linear_weights(model.lm_head)

    def prefill(length):
        return 2 * length * linear_weights(decoder) + 4 * length * (length + 1) // 2 * text_width

    full, reduced = rows["full"]["prompt_tokens"], rows["visionzip"]["prompt_tokens"]
    assert rows["full"]["llm_prefill_gflops"] * 1e9 == pytest.approx(2 * (2 * prefill(full) + head))
    assert rows["fastv"]["llm_prefill_gflops"] * 1e9 == pytest.approx(2 * (prefill(full) + prefill(reduced) + head))


def test_kv_cache_helper_without_layers():
    assert kv_cache_bytes_after_prefill(None, 3) is None
    counter = FlopCounter(torch.nn.ModuleList(), torch.nn.ModuleList())
    with counter:
        pass
    assert counter.count.tower_gflops == 0


def test_variants():
    variants = build_variants(["visionzip", "fastv", "visionzip"], [64, 128, 64])
    assert [v.label for v in variants] == ["full", "visionzip@64", "visionzip@128", "fastv@64", "fastv@128"]
    with pytest.raises(ValueError, match="methods must be among"):
        build_variants(["nope"], [64])
    with pytest.raises(ValueError, match="budget"):
        build_variants(["visionzip"], [0])
    with pytest.raises(ValueError, match="empty"):
        build_variants([], [64])


def test_bad_inputs(model, inputs):
    with pytest.raises(ValueError, match="new_tokens"):
        PipelineBench(model, inputs, [Variant(FULL)], new_tokens=0)
    text_only = make_llava_processor().tokenizer([PROMPT.replace("<image> ", "")], return_tensors="pt")
    with pytest.raises(ValueError, match="no image placeholder"):
        PipelineBench(model, text_only, [Variant(FULL)])
    with pytest.raises(ValueError, match="dominant \\+ contextual must be <= 576"):
        PipelineBench(model, inputs, [Variant("visionzip", 600)])


def test_unit_tokens_follow_the_processed_resolution(model):
    from vlmzip.variants import unit_tokens

    assert unit_tokens(model, {"pixel_values": torch.zeros(1, 3, 336, 336)}) == 577
    assert unit_tokens(model, {"pixel_values": torch.zeros(1, 3, 224, 224)}) == 1 + 16 * 16  # not the config's 336
    assert unit_tokens(model, {}) == 577


def _timed_row(method, tower, prefill, ttft, cpu_scale):
    """A summary row with given wall-clock times, and CPU times `cpu_scale` times them."""
    row = {"method": method, "llm_tokens": 10.0, "decode_tok_s": 1.0, "peak_mem_mb": 1.0, "kv_cache_mb": 1.0}
    row |= {"tower_gflops": 1.0, "llm_prefill_gflops": 1.0, "e2e_ms": ttft + 1, "e2e_cpu_ms": (ttft + 1) * cpu_scale}
    for name, value in (("tower", tower), ("llm_prefill", prefill), ("ttft", ttft)):
        row[f"{name}_ms"], row[f"{name}_cpu_ms"] = value, value * cpu_scale
    return row


def test_ttft_limit_and_tower_ratio_by_hand():
    # All tokens: tower 100, prefill 300, TTFT 410. Reduced: tower 102, prefill 60, TTFT 180.
    full, reduced = with_ratios([_timed_row("full", 100, 300, 410, 2.0), _timed_row("visionzip", 102, 60, 180, 1.5)])
    assert reduced["tower_ratio"] == pytest.approx(1.02) and reduced["tower_ratio_cpu"] == pytest.approx(1.02 * 0.75)
    assert reduced["ttft_limit"] == pytest.approx(410 / 162)  # TTFT(all) / (tower + prefill)
    assert reduced["ttft_limit_cpu"] == pytest.approx(410 * 2.0 / (162 * 1.5))
    assert reduced["speedup_ttft"] == pytest.approx(410 / 180)
    assert reduced["ttft_of_limit"] == pytest.approx(reduced["speedup_ttft"] / reduced["ttft_limit"])
    assert reduced["ttft_of_limit"] == pytest.approx(162 / 180) == reduced["ttft_of_limit_cpu"]
    assert full["tower_ratio"] == 1.0 and full["ttft_limit"] == pytest.approx(410 / 400)
    zero = with_ratios([_timed_row("full", 0, 0, 0, 1.0), _timed_row("visionzip", 0, 0, 0, 1.0)])[1]
    assert zero["tower_ratio"] is None and zero["ttft_limit"] is None and zero["ttft_of_limit"] is None
