"""The lmms-eval plugin's model class without lmms-eval: which variant it runs, its prompt and its inputs.

lmms-eval itself (a ~7 GB stack) runs in its own venv (.ci/eval-plugin, test_lmms_eval_plugin.py). Here a
stand-in for the two names the plugin imports from it lets the default suite check the plugin's own logic.
"""

from __future__ import annotations

import importlib
import sys
import types

import pytest
import torch

import vlmzip
from bench.tiny_model import save_tiny_llava
from conftest import IMAGE_TOKEN_ID, random_images
from vlmzip.methods.fastv import FastV

PLUGIN = "vlmzip.integrations.lmms_eval_plugin"


@pytest.fixture(scope="module")
def plugin():
    """The plugin module, imported against a stand-in lmms_eval (restored afterwards)."""
    saved = {
        name: module for name, module in sys.modules.items() if name == "lmms_eval" or name.startswith("lmms_eval.")
    }
    saved_plugin = sys.modules.pop(PLUGIN, None)
    base = types.ModuleType("lmms_eval")
    api = types.ModuleType("lmms_eval.api")
    instance, model = types.ModuleType("lmms_eval.api.instance"), types.ModuleType("lmms_eval.api.model")
    instance.Instance = type("Instance", (), {})

    class Lmms:
        def __init__(self) -> None:
            self.rank = 0

    model.lmms = Lmms
    stand_ins = {
        "lmms_eval": base,
        "lmms_eval.api": api,
        "lmms_eval.api.instance": instance,
        "lmms_eval.api.model": model,
    }
    sys.modules.update(stand_ins)
    try:
        yield importlib.import_module(PLUGIN)
    finally:
        for name in stand_ins:
            sys.modules.pop(name, None)
        sys.modules.update(saved)
        sys.modules.pop(PLUGIN, None)
        if saved_plugin is not None:
            sys.modules[PLUGIN] = saved_plugin


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


def encoded(model, text: str = "what is it ?"):
    return model._encode([model._prompt(text, 1)], random_images(1, seed=2))


def test_method_dispatch(plugin, model_dir):
    reduced = plugin.VisionZipLlava(pretrained=str(model_dir), dominant=30, contextual=4)
    assert vlmzip.is_applied(reduced.model) and reduced.runner.reduces_before_llm
    assert (reduced.variant.config().dominant, reduced.variant.config().contextual) == (30, 4)
    prepared = reduced._prepared(encoded(reduced))
    assert int((prepared["input_ids"] == IMAGE_TOKEN_ID).sum()) == 34

    pooled = plugin.VisionZipLlava(pretrained=str(model_dir), tokens=16, method="pool")
    assert pooled.variant.config().method == "pool" and pooled.variant.config().tokens == 16

    full = plugin.VisionZipLlava(pretrained=str(model_dir), method="full")
    assert not vlmzip.is_applied(full.model) and full.runner.pruner is None
    inputs = encoded(full)
    prepared = full._prepared(inputs)
    assert torch.equal(prepared["input_ids"], inputs["input_ids"])  # every placeholder stays
    assert "pixel_values" not in prepared and "mm_encoder_outputs" in prepared

    fastv = plugin.VisionZipLlava(pretrained=str(model_dir), method="fastv", tokens=8)
    assert isinstance(fastv.runner.pruner, FastV) and fastv.runner.pruner.tokens == 8
    assert not vlmzip.is_applied(fastv.model)
    with pytest.raises(NotImplementedError, match="method=fastv prunes inside the language model"):
        fastv.loglikelihood([object()])


def test_prompt_without_chat_template(plugin, model_dir):
    model = plugin.VisionZipLlava(pretrained=str(model_dir), method="full")
    model.processor.chat_template = None
    assert model._prompt("what ?", 2) == "USER: <image>\n<image>\nwhat ? ASSISTANT:"
    assert model._prompt("<image>\nwhat ?", 1) == "USER: <image>\nwhat ? ASSISTANT:"  # the task placed its image


def test_bad_model_args(plugin, model_dir):
    with pytest.raises(ValueError, match="unknown arguments"):
        plugin.VisionZipLlava(pretrained=str(model_dir), budget=3)
    with pytest.raises(ValueError, match="not both"):
        plugin.VisionZipLlava(pretrained=str(model_dir), tokens=64, dominant=54)
    with pytest.raises(ValueError, match="method must be one of"):
        plugin.VisionZipLlava(pretrained=str(model_dir), method="nope")
    with pytest.raises(ValueError, match="model_args: dtype must be one of float32, bfloat16, float16"):
        plugin.VisionZipLlava(pretrained=str(model_dir), dtype="int4")
    with pytest.raises(ValueError, match="dominant \\+ contextual must be <="):
        plugin.VisionZipLlava(pretrained=str(model_dir), tokens=100000)
