"""`vlmzip bench` end to end on a tiny local model, the --arch table, and its errors."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bench.tiny_model import save_tiny_llava
from vlmzip.bench import arch
from vlmzip.bench.cli import synthetic_image
from vlmzip.cli import main

REQUIRED = {"method", "tokens", "llm_prefill_ms", "ttft_ms", "speedup_llm_prefill", "speedup_ttft", "peak_mem_mb"}
FAST = ["--repeats", "1", "--warmup", "0", "--new-tokens", "2", "--question", "what is in the image ?"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def test_json_plot_and_table(model_dir, tmp_path, capsys):
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    argv = ["bench", "--model", str(model_dir), "--methods", "visionzip", "fastv", "--tokens", "64", "128"]
    assert main([*argv, *FAST, "--json", str(out), "--plot", str(picture)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["method"], row["tokens"]) for row in rows] == [
        ("full", 576), ("visionzip", 64), ("visionzip", 128), ("fastv", 64), ("fastv", 128)
    ]  # fmt: skip
    assert all(REQUIRED <= row.keys() for row in rows)
    assert rows[0]["speedup_ttft"] == 1.0 and rows[0]["device"] == "cpu"
    assert picture.stat().st_size > 1000
    table = capsys.readouterr().out
    assert "visionzip" in table and "fastv" in table and "TTFT" in table


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "nope"], "methods must be among"),
        (["--json", "out.txt"], "--json must name a .json file"),
        (["--plot", "out.jpg"], "--plot must name a .png file"),
        (["--batch", "0"], "--batch"),
        (["--new-tokens", "1"], "--new-tokens"),
        (["--tokens", "700"], r"dominant \+ contextual must be <= 576"),
        (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--repeats", "0"], "CUDA|--repeats"),
    ],
)
def test_bad_arguments_exit_2(model_dir, capsys, extra, message):
    assert main(["bench", "--model", str(model_dir), *FAST, *extra]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after any weight-loading progress bar
    assert error.startswith("vlmzip bench: error: ") and re.search(message, error), error


def test_model_and_arch_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--model", "x", "--arch", "llava-1.5-7b"])
    assert main(["bench", "--arch", "nope", *FAST]) == 2
    assert "--arch must be one of" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "parameters", "prompt", "image_tokens"),
    [
        ("llava-1.5-7b", 7.06e9, "USER: <image>\nwhat ASSISTANT:", 576),
        ("llava-next-7b", 7.06e9, "USER: <image>\nwhat ASSISTANT:", 576 + 48 * 48 + 48),  # base + 2x2 crops
        ("qwen2-vl-2b", 2.21e9, "<|vision_start|><|image_pad|><|vision_end|>what", 576),  # 48x48 patches, 2x2 merged
        ("qwen2.5-vl-7b", 8.29e9, "<|vision_start|><|image_pad|><|vision_end|>what", 576),  # 672 px, patch 14
        ("qwen3-vl-8b", 8.77e9, "<|vision_start|><|image_pad|><|vision_end|>what", 576),  # 768 px, patch 16
    ],
)
def test_published_shapes_without_memory(name, parameters, prompt, image_tokens):
    model, processor = arch.build_arch(name, device="meta")  # no memory: shapes only
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(parameters, rel=0.005)
    assert model.dtype == torch.bfloat16
    inputs = processor(images=[synthetic_image(arch.ARCHS[name].image_size)], text=[prompt])
    assert inputs["input_ids"][0].count(model.config.image_token_id) == image_tokens


def test_arch_command_with_a_small_entry(monkeypatch, tmp_path):
    def small_config():
        config = arch._llava_15_7b_config()
        config.vision_config.update({"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128})
        config.vision_config.num_attention_heads = 4
        config.text_config.update({"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128})
        config.text_config.update({"num_attention_heads": 4, "num_key_value_heads": 4})
        return config

    spec = arch.ArchSpec("small", "test entry", small_config, arch._llava_15_processor, budgets=(64,))
    monkeypatch.setitem(arch.ARCHS, "small", spec)
    out = tmp_path / "arch.json"
    assert (
        main(["bench", "--arch", "small", "--methods", "visionzip", "--dtype", "float32", *FAST, "--json", str(out)])
        == 0
    )
    rows = json.loads(out.read_text())
    assert [(row["method"], row["tokens"], row["dtype"]) for row in rows] == [
        ("full", 576, "float32"), ("visionzip", 64, "float32")
    ]  # fmt: skip


def test_questions_per_image_and_int8(model_dir, tmp_path, capsys):
    out = tmp_path / "later.json"
    argv = ["bench", "--model", str(model_dir), "--methods", "visionzip", "--tokens", "64", *FAST]
    assert main([*argv, "--questions-per-image", "3", "--quantize", "int8", "--json", str(out)]) == 0
    full, reduced = json.loads(out.read_text())
    assert full["ttft_later_ms"] is None and full["quantize"] == "int8" and full["questions_per_image"] == 3
    assert reduced["ttft_later_ms"] > 0 and reduced["llm_prefill_later_ms"] > 0
    # A later question runs no tower: its TTFT is the prefill plus the cache lookup.
    assert reduced["tower_later_ms"] < reduced["tower_ms"]
    assert reduced["ttft_later_over_prefill"] == pytest.approx(
        reduced["ttft_later_ms"] / reduced["llm_prefill_later_ms"]
    )
    assert "later" in capsys.readouterr().out


def test_unquantized_and_int8_side_by_side_in_one_run(model_dir, tmp_path, capsys):
    out = tmp_path / "both.json"
    argv = ["bench", "--model", str(model_dir), "--methods", "visionzip", "--tokens", "64", *FAST]
    assert main([*argv, "--quantize", "none", "int8", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["method"], row["quantize"]) for row in rows] == [
        ("full", "none"), ("visionzip", "none"), ("full", "int8"), ("visionzip", "int8")
    ]  # fmt: skip
    base = rows[0]
    for row in rows:  # every ratio is to all tokens in the model's own dtype
        assert row["speedup_ttft"] == pytest.approx(base["ttft_ms"] / row["ttft_ms"])
        assert row["mem_ratio"] == pytest.approx(row["peak_mem_mb"] / base["peak_mem_mb"])
    assert rows[0]["speedup_ttft"] == 1.0 and rows[2]["speedup_ttft"] != 1.0
    assert "visionzip int8" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--questions-per-image", "0"], "--questions-per-image"),
        (["--quantize", "int4"], "invalid choice"),
        (["--quantize", "int8", "none"], "give 'none' before 'int8'"),
    ],
)
def test_bad_questions_and_quantize(model_dir, capsys, extra, message):
    code = None
    try:
        code = main(["bench", "--model", str(model_dir), *FAST, *extra])
    except SystemExit as exit_:  # argparse refuses unknown choices itself
        code = exit_.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_questions_for_are_distinct():
    from vlmzip.bench.cli import questions_for

    questions = questions_for("first?", 9)
    assert questions[0] == "first?" and len(set(questions)) == 9


def test_qwen3_arch_command_with_shared_layer_weights(monkeypatch, tmp_path, capsys):
    def small_config():
        config = arch._qwen3_vl_8b_config()
        config.vision_config.update({"depth": 3, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4})
        config.vision_config.update({"out_hidden_size": 64, "deepstack_visual_indexes": [0, 1]})
        config.text_config.update({"num_hidden_layers": 3, "hidden_size": 64, "intermediate_size": 128})
        config.text_config.update({"num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
        config.text_config.rope_parameters["mrope_section"] = [2, 3, 3]
        return config

    spec = arch.ArchSpec(
        "small-qwen3", "test entry", small_config, arch._qwen3_vl_processor, budgets=(16,), image_size=256
    )
    monkeypatch.setitem(arch.ARCHS, "small-qwen3", spec)
    out = tmp_path / "arch.json"
    argv = ["bench", "--arch", "small-qwen3", "--shared-layer-weights", "--methods", "visionzip", "--dtype", "float32"]
    assert main([*argv, *FAST, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(row["method"], row["tokens"], row["shared_layer_weights"]) for row in rows] == [
        ("full", 64, True), ("visionzip", 16, True)
    ]  # fmt: skip
    assert rows[1]["tower_gflops"] < rows[0]["tower_gflops"] * 1.01  # the probe's tower does the same work
    full, reduced = rows
    assert reduced["ttft_limit_cpu"] == pytest.approx(
        full["ttft_cpu_ms"] / (reduced["tower_cpu_ms"] + reduced["llm_prefill_cpu_ms"])
    )
    assert reduced["tower_ratio"] == pytest.approx(reduced["tower_ms"] / full["tower_ms"])
    assert 0 < reduced["ttft_of_limit"] <= 1 and 0 < reduced["ttft_of_limit_cpu"] <= 1
    footer = capsys.readouterr().out.splitlines()[-1]  # the limit line of the reduced row, under the table
    expected = f"{reduced['ttft_limit']:.2f}x / {reduced['ttft_limit_cpu']:.2f}x"
    assert footer.startswith("visionzip 16: tower ") and f"limit {expected}" in footer, footer
    assert main(["bench", "--model", "x", "--shared-layer-weights", *FAST]) == 2
