"""`python -m vlmzip.bench.tower`: the tower routes (CLIP and Qwen) and their table."""

from __future__ import annotations

import pytest
import torch

from vlmzip.bench import arch, tower


def _small_qwen25():
    config = arch._qwen2_5_vl_7b_config()
    config.vision_config.update({"depth": 4, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4})
    config.vision_config.update({"out_hidden_size": 32, "fullatt_block_indexes": [1, 3]})
    return config


def _small_qwen3():
    config = arch._qwen3_vl_8b_config()
    config.vision_config.update({"depth": 3, "hidden_size": 64, "intermediate_size": 128, "num_heads": 4})
    config.vision_config.update({"out_hidden_size": 32, "deepstack_visual_indexes": [0, 1]})
    return config


@pytest.fixture
def small_qwen(monkeypatch):
    entries = {
        "small-qwen2.5": arch.ArchSpec("small-qwen2.5", "test", _small_qwen25, arch._qwen2_vl_processor, (16,), 224),
        "small-qwen3": arch.ArchSpec("small-qwen3", "test", _small_qwen3, arch._qwen3_vl_processor, (16,), 256),
    }
    for name, spec in entries.items():
        monkeypatch.setitem(arch.ARCHS, name, spec)
    monkeypatch.setattr(tower, "QWEN_TOWERS", (*tower.QWEN_TOWERS, *entries))
    return entries


@pytest.mark.parametrize(("name", "units", "layers"), [("small-qwen2.5", 64, 1), ("small-qwen3", 64, 3)])
def test_qwen_routes_run_the_arch_tower(small_qwen, name, units, layers):
    # 224 px / patch 14 and 256 px / patch 16: 16 x 16 patches, 8 x 8 = 64 merge units per image.
    routes = tower.qwen_routes(name, torch.float32, batch=2, dominant=10, contextual=3)
    assert list(routes) == ["plain", "visionzip"]
    with torch.inference_mode():
        plain = routes["plain"]()
        reduced = routes["visionzip"]()
    assert plain.shape == (2 * units, 32)  # the merger output of both images
    # One reduction per image, of the merger output (and the deepstack mergers' outputs, Qwen3-VL).
    assert [item.shape for item in reduced] == [(1, 13, 32 * layers)] * 2
    # Dominant tokens are merger outputs of the plain route, unchanged.
    first = plain[:units]
    assert all(bool((row[:32] == first).all(dim=1).any()) for row in reduced[0][0, :10])


def test_qwen_tower_table(small_qwen, capsys):
    argv = ["--tower", "small-qwen3", "--batch", "1", "--repeats", "2", "--warmup", "0"]
    assert tower.main([*argv, "--dominant", "10", "--contextual", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tower=small-qwen3 batch=1") and "CPU vs plain" in lines[1]
    assert [line.split()[0] for line in lines[2:4]] == ["plain", "visionzip"]
    assert lines[2].split()[4] == "1.00x" and lines[-1].startswith("visionzip / plain = ")
    assert "eager" not in lines[-1]  # Qwen towers have no eager route


def test_clip_tower_table(capsys):
    assert tower.main(["--batch", "1", "--repeats", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[2:5]] == ["plain", "visionzip", "eager"]
    assert "eager / visionzip" in lines[-1]


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        tower.main(["--repeats", "0"])
    with pytest.raises(SystemExit):
        tower.main(["--tower", "nope"])
    with pytest.raises(ValueError, match="arch must be one of"):
        arch.build_arch_tower("nope")
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        arch.build_arch_tower("qwen2.5-vl-7b", torch.int64)
