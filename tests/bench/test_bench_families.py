"""`vlmzip bench` and `vlmzip eval` on a saved tiny model of every supported family, through the real CLI."""

from __future__ import annotations

import json

import pytest
import torch

from bench.tiny_model import save_family
from eval.tiny_data import write_vqa
from vlmzip.cli import main
from vlmzip.methods import available_methods

# family -> (visual tokens per image or crop, units per image, whether FastV runs). Units: crops the
# model's tower sees per image, the same for the 336 px benchmark picture and the 300x400 eval images:
# LLaVA-NeXT's base + a 1x2 grid of 336 px crops, OneVision's base + 3x3 crops of 98 px (49 tokens each,
# no [CLS]); Qwen's 2x2-merged tokens of one image (64 for the benchmark picture).
CASES = {
    "llava-1.5": (64, 1, True),
    "llava-next": (64, 3, True),
    "llava-onevision": (8, 10, True),
    "qwen2-vl": (16, 1, False),  # M-RoPE: FastV is left out
    "qwen2.5-vl": (16, 1, False),
    "smolvlm": (4, 5, True),  # 2 x 2 tiles + the global image, 16 shuffled tokens each
    "mistral3": (16, 1, True),  # one image of 8 x 8 merged tokens (the 336 px picture at <= 128 px)
}
# Layout tokens a reduced image drops besides its placeholders: Mistral 3's [IMG_BREAK] after each of the
# first 7 of the picture's 8 rows of merged tokens.
DROPPED_LAYOUT = {"mistral3": 7}
SPEEDUPS = ("speedup_llm_prefill", "speedup_llm_prefill_cpu", "speedup_ttft", "speedup_ttft_cpu", "speedup_e2e")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    saved = {}

    def get(family: str):
        if family not in saved:
            saved[family] = save_family(family, tmp_path_factory.mktemp(family))
        return saved[family]

    return get


@pytest.fixture(autouse=True)
def keep_threads():
    # `--threads 1` sets torch's process-wide count (one thread is the fastest on a busy shared CPU).
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def bench(model, tokens, out, *extra):
    argv = ["bench", "--model", str(model), "--tokens", str(tokens), "--repeats", "1", "--warmup", "0"]
    return main([*argv, "--new-tokens", "2", "--threads", "1", "--json", str(out), *extra])


@pytest.mark.parametrize("family", list(CASES))
def test_bench_every_method_on_the_family(family, model_dir, tmp_path, capsys):
    tokens, units, fastv_runs = CASES[family]
    out = tmp_path / "bench.json"
    assert bench(model_dir(family), tokens, out) == 0
    captured = capsys.readouterr()
    rows = json.loads(out.read_text())
    expected = ["full", *available_methods(), *(["fastv"] if fastv_runs else [])]
    assert [row["method"] for row in rows] == expected
    assert ("fastv left out" in captured.err and "M-RoPE" in captured.err) is not fastv_runs

    full = rows[0]
    text_tokens = full["prompt_tokens"] - full["tokens"]
    reduced_text_tokens = text_tokens - DROPPED_LAYOUT.get(family, 0)
    assert full["llm_tokens"] == full["prompt_tokens"] and full["tokens"] > tokens * units
    for row in rows:
        assert all(row[key] is not None and row[key] > 0 for key in SPEEDUPS), row
        assert row["llm_prefill_ms"] > 0 and row["ttft_ms"] >= row["llm_prefill_ms"] and row["tower_gflops"] > 0
        assert row["method"] in captured.out  # the printed table
    assert full["speedup_llm_prefill"] == 1.0
    for row in rows[1:]:
        assert row["kv_cache_mb"] < full["kv_cache_mb"] and row["llm_prefill_gflops"] < full["llm_prefill_gflops"]
        if row["method"] == "fastv":  # full sequence into the first layers, pruned after layer K
            assert row["prompt_tokens"] == full["prompt_tokens"] and row["tokens"] < full["tokens"]
            assert full["llm_tokens"] > row["llm_tokens"] > text_tokens + row["tokens"]
        else:  # exactly the budget reaches the language model: every crop reduced alike
            assert row["tokens"] == tokens * units, row
            assert row["llm_tokens"] == row["prompt_tokens"] == reduced_text_tokens + tokens * units


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-onevision"])
def test_bench_refuses_what_the_family_cannot_run(family, model_dir, tmp_path, capsys):
    if family == "qwen2-vl":  # FastV asked for by name on an M-RoPE model
        status, message = bench(model_dir(family), 16, tmp_path / "x.json", "--methods", "fastv"), "M-RoPE"
    else:  # more tokens per crop than OneVision's tower yields (49 per 98 px crop)
        status, message = bench(model_dir(family), 64, tmp_path / "x.json"), "must be <= 49"
    assert status == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vlmzip bench: error: ") and message in error, error


@pytest.mark.parametrize("family", list(CASES))
def test_eval_accepts_the_family(family, model_dir, tmp_path):
    tokens, units, _ = CASES[family]
    data = write_vqa(tmp_path / "vqa", images=1)
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(model_dir(family)), "--data", str(data), "--methods", "visionzip"]
    assert main([*argv, "--tokens", str(tokens), "--max-new-tokens", "1", "--json", str(out)]) == 0
    full, reduced = json.loads(out.read_text())["results"]
    assert (full["method"], reduced["method"]) == ("full", "visionzip")
    assert reduced["tokens"] == tokens * units < full["tokens"]
    assert full["n"] == reduced["n"] == 3 and 0.0 <= reduced["accuracy"] <= 1.0


def test_processor_with_a_video_slot_loads_without_torchvision(model_dir):
    from vlmzip.loading import load_model

    _, processor = load_model(model_dir("llava-onevision"))
    assert type(processor).__name__ == "LlavaOnevisionProcessor" and not hasattr(processor, "video_processor")
    assert (processor.vision_aspect_ratio, processor.num_image_tokens) == ("anyres_max_2", 49)  # saved settings
