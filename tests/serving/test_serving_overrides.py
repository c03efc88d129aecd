"""A VisionZip budget in --hf-overrides for a model the plugin does not serve stops vLLM before it starts.

Needs vLLM (run from `.ci/vllm-tests` in .venv-vllm); skipped where vLLM is not importable.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from vlmzip.config import VisionZipConfig  # noqa: E402
from vlmzip.export import export_model  # noqa: E402
from vlmzip.serving import register  # noqa: E402
from vlmzip.serving.tiny import build_tiny_llava  # noqa: E402

BUDGET = {"visionzip": {"dominant": 20, "contextual": 4}}


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("overrides")
    source = build_tiny_llava(root / "tiny")
    export_model(source, root / "plain", plugin=False)
    export_model(source, root / "zipped", VisionZipConfig())
    return root / "plain", root / "zipped"


def test_vllm_serve_refuses_a_budget_for_a_plain_export(exports, tmp_path):
    plain, _ = exports
    vllm = shutil.which("vllm") or str(Path(sys.executable).with_name("vllm"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}
    command = [vllm, "serve", str(plain), "--hf-overrides", json.dumps(BUDGET), "--port", "1"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert finished.returncode != 0
    assert "which the VisionZip plugin does not serve" in finished.stderr, finished.stderr[-3000:]


def test_engine_arguments_with_a_budget_for_a_plain_export_are_refused(exports, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    plain, zipped = exports
    monkeypatch.setattr(sys, "argv", ["python", "script.py"])

    def set_up(self):  # register() runs inside EngineArgs' construction, which holds them as `self`
        register()

    with pytest.raises(ValueError, match="does not serve"):
        set_up(EngineArgs(model=str(plain), hf_overrides=BUDGET))
    set_up(EngineArgs(model=str(zipped), hf_overrides=BUDGET))
    set_up(EngineArgs(model=str(plain)))


def test_register_names_every_plugin_class_and_the_entry_point_calls_it():
    import importlib
    from importlib.metadata import entry_points

    from vllm import ModelRegistry

    from vlmzip.serving import MODEL_PATHS
    from vlmzip.serving.settings import PLUGIN_ARCHITECTURES

    assert set(MODEL_PATHS) == set(PLUGIN_ARCHITECTURES.values())
    assert {"VisionZipQwen2_5_VLForConditionalGeneration", "VisionZipQwen3VLForConditionalGeneration"} <= set(
        MODEL_PATHS
    )
    plugins = {point.value for point in entry_points(group="vllm.general_plugins")}
    assert "vlmzip.serving:register" in plugins
    register()
    supported = ModelRegistry.get_supported_archs()
    for architecture, path in MODEL_PATHS.items():
        assert architecture in supported
        module, name = path.split(":")
        assert getattr(importlib.import_module(module), name).__name__ == architecture
