"""`vlmzip export` and the serving budget resolution: no vLLM needed (these run in the default suite)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, LlavaForConditionalGeneration

from vlmzip.cli import main as cli_main
from vlmzip.config import VisionZipConfig
from vlmzip.export import export_model, vllm_weight_name
from vlmzip.serving.settings import (
    ARCHITECTURE,
    CONFIG_FILENAME,
    absolute_feature_layer,
    check_servable,
    resolve_config,
)
from vlmzip.serving.tiny import build_tiny_llava

VLLM_PREFIXES = (
    "vision_tower.vision_model.",
    "language_model.model.",
    "language_model.lm_head.",
    "multi_modal_projector.",
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llava(tmp_path_factory.mktemp("tiny") / "llava")


@pytest.fixture(scope="module")
def exported(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("exported") / "out"
    export_model(tiny_dir, out, VisionZipConfig(dominant=20, contextual=4))
    return out


def tensors(path):
    with safe_open(str(path / "model.safetensors"), framework="pt") as shard:
        return {name: shard.get_tensor(name) for name in shard.keys()}  # noqa: SIM118


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "vision_tower.encoder.layers.0.self_attn.q_proj.weight",
            "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        ),
        (
            "vision_tower.vision_model.embeddings.class_embedding",
            "vision_tower.vision_model.embeddings.class_embedding",
        ),
        (
            "model.vision_tower.embeddings.patch_embedding.weight",
            "vision_tower.vision_model.embeddings.patch_embedding.weight",
        ),
        ("model.language_model.layers.1.mlp.up_proj.weight", "language_model.model.layers.1.mlp.up_proj.weight"),
        ("language_model.model.norm.weight", "language_model.model.norm.weight"),
        ("lm_head.weight", "language_model.lm_head.weight"),
        ("model.multi_modal_projector.linear_1.bias", "multi_modal_projector.linear_1.bias"),
    ],
)
def test_vllm_weight_names(name, expected):
    assert vllm_weight_name(name) == expected


def test_export_writes_a_servable_directory(tiny_dir, exported):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == [ARCHITECTURE]
    assert config["model_type"] == "llava"
    stored = json.loads((exported / CONFIG_FILENAME).read_text())
    assert stored == VisionZipConfig(dominant=20, contextual=4).to_dict()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        assert (exported / name).read_bytes() == (tiny_dir / name).read_bytes(), name
    source, target = tensors(tiny_dir), tensors(exported)
    assert len(target) == len(source)
    assert all(name.startswith(VLLM_PREFIXES) for name in target), sorted(target)[:5]
    for name, tensor in source.items():
        assert torch.equal(target[vllm_weight_name(name)], tensor), name


def test_exported_directory_loads_in_transformers_unchanged(tiny_dir, exported):
    processor = AutoProcessor.from_pretrained(exported)
    inputs = processor(
        images=[torch.zeros(3, 336, 336, dtype=torch.uint8)],
        text=["USER: <image> what ? ASSISTANT:"],
        return_tensors="pt",
    )
    with torch.no_grad():
        original = LlavaForConditionalGeneration.from_pretrained(tiny_dir).eval()(**inputs).logits
        reloaded = LlavaForConditionalGeneration.from_pretrained(exported).eval()(**inputs).logits
    assert torch.equal(original, reloaded)


def test_export_keeps_the_source_budget_by_default(tiny_dir, tmp_path):
    source = tmp_path / "tuned"
    source.mkdir()
    for path in tiny_dir.iterdir():
        (source / path.name).write_bytes(path.read_bytes())
    tuned = VisionZipConfig(dominant=108, contextual=20)
    (source / CONFIG_FILENAME).write_text(json.dumps(tuned.to_dict()))
    assert export_model(source, tmp_path / "out") == tuned
    assert json.loads((tmp_path / "out" / CONFIG_FILENAME).read_text()) == tuned.to_dict()
    assert export_model(tiny_dir, tmp_path / "plain") == VisionZipConfig()


def test_export_errors(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"dominant \+ contextual must be <= 577"):
        export_model(tiny_dir, tmp_path / "a", VisionZipConfig(dominant=570, contextual=10))
    assert not (tmp_path / "a").exists()  # validated before anything is written
    text_only = tmp_path / "llama"
    text_only.mkdir()
    (text_only / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64})
    )
    with pytest.raises(ValueError, match=r"unsupported architecture \['LlamaForCausalLM'\]"):
        export_model(text_only, tmp_path / "b")
    with pytest.raises(ValueError, match="not a directory"):
        export_model(tmp_path / "missing", tmp_path / "c")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        export_model(tiny_dir, busy)
    for output in (tiny_dir, tiny_dir / "sub", tiny_dir.parent):  # is, inside, contains --model
        with pytest.raises(ValueError, match="the input --model"):
            export_model(tiny_dir, output, overwrite=True)
    assert not (tiny_dir / "sub").exists()
    with pytest.raises(TypeError, match="config"):
        export_model(tiny_dir, tmp_path / "d", {"dominant": 3})


def test_force_replaces_the_whole_output_and_an_interrupt_keeps_the_old_one(tiny_dir, tmp_path, monkeypatch):
    import vlmzip.export

    out = tmp_path / "out"
    out.mkdir()
    for stale in ("model.safetensors.index.json", "model-00001-of-00002.safetensors", "keep.txt"):
        (out / stale).write_text("from an earlier export")
    before = sorted(p.name for p in out.iterdir())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vlmzip.export, "_rename_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(tiny_dir, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no half-written directory beside it
    monkeypatch.undo()
    export_model(tiny_dir, out, overwrite=True)
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" not in names and "keep.txt" not in names
    assert [n for n in names if n.endswith(".safetensors")] == ["model.safetensors"]
    assert LlavaForConditionalGeneration.from_pretrained(out) is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_cli_export(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli_main(["export", "--model", str(tiny_dir), "-o", str(out), "--tokens", "128"]) == 0
    assert "108 + 20 = 128 tokens per image" in capsys.readouterr().out
    assert json.loads((out / CONFIG_FILENAME).read_text())["dominant"] == 108
    assert cli_main(["export", "--model", str(tiny_dir), "-o", str(tmp_path / "x"), "--dominant", "20"]) == 2
    assert "--dominant and --contextual must be given together" in capsys.readouterr().err
    args = ["export", "--model", str(tiny_dir), "-o", str(tmp_path / "y"), "--dominant", "600", "--contextual", "0"]
    assert cli_main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("vlmzip export: error: dominant + contextual must be <= 577") and "\n" not in error
    assert cli_main(["export", "--model", str(tiny_dir), "-o", str(tiny_dir), "--force"]) == 2
    assert "-o/--output" in capsys.readouterr().err


# --- the serving budget: visionzip_config.json + --hf-overrides ------------------------------------
def hf_config(model_dir, **overrides):
    config = AutoConfig.from_pretrained(model_dir)
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def test_resolve_config_file_then_overrides(exported, tiny_dir):
    assert resolve_config(exported, hf_config(exported)) == VisionZipConfig(dominant=20, contextual=4)
    partial = hf_config(exported, visionzip={"contextual": 10})
    assert resolve_config(exported, partial) == VisionZipConfig(dominant=20, contextual=10)
    only_overrides = hf_config(tiny_dir, visionzip={"dominant": 30, "contextual": 2, "method": "pool"})
    assert resolve_config(tiny_dir, only_overrides) == VisionZipConfig(dominant=30, contextual=2, method="pool")


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"visionzip": {"dominant": 570, "contextual": 10}}, ValueError, r"dominant \+ contextual must be <= 577"),
        ({"visionzip": {"dominnt": 5}}, ValueError, "unknown VisionZipConfig fields"),
        ({"visionzip": {"dominant": -1}}, ValueError, "dominant"),
        ({"visionzip": 64}, TypeError, "must be an object of VisionZipConfig fields"),
        ({"visionzip": {"feature_layer": -1}}, ValueError, "no deeper than the model's vision_feature_layer"),
        ({"vision_feature_layer": [-2, -3]}, ValueError, "needs one feature layer"),
        ({"model_type": "qwen2_vl"}, ValueError, "unsupported architecture"),
    ],
)
def test_resolve_config_rejects(exported, overrides, error, match):
    with pytest.raises(error, match=match):
        resolve_config(exported, hf_config(exported, **overrides))


def test_resolve_config_needs_a_budget(tiny_dir):
    with pytest.raises(ValueError, match=f"no {CONFIG_FILENAME}; create the directory with `vlmzip export"):
        resolve_config(tiny_dir, hf_config(tiny_dir))


def test_unsupported_tower(exported):
    config = hf_config(exported)
    config.vision_config.model_type = "siglip_vision_model"
    with pytest.raises(ValueError, match="unsupported vision tower 'siglip_vision_model'"):
        check_servable(config, VisionZipConfig())


def test_feature_layer_is_absolute_against_the_full_tower(exported):
    config = hf_config(exported)  # 4-layer tower, vision_feature_layer -2: vLLM builds 3 layers
    assert absolute_feature_layer(config, VisionZipConfig()) == 3
    assert absolute_feature_layer(config, VisionZipConfig(feature_layer=-3)) == 2
    assert absolute_feature_layer(config, VisionZipConfig(feature_layer=1)) == 1


def test_tiny_builder_validates(tmp_path):
    with pytest.raises(ValueError, match="text_hidden must be a multiple of 32"):
        build_tiny_llava(tmp_path, text_hidden=48)
    with pytest.raises(ValueError, match="vision_layers"):
        build_tiny_llava(tmp_path, vision_layers=1)


def test_plain_export_is_vllm_own_llava(tiny_dir, tmp_path, capsys):
    out = tmp_path / "plain"
    assert cli_main(["export", "--model", str(tiny_dir), "-o", str(out), "--plain"]) == 0
    assert "vLLM's own LLaVA" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlavaForConditionalGeneration"]
    assert not (out / CONFIG_FILENAME).exists()
    assert all(name.startswith(VLLM_PREFIXES) for name in tensors(out))
    assert cli_main(["export", "--model", str(tiny_dir), "-o", str(tmp_path / "p2"), "--plain", "--tokens", "64"]) == 2
    assert "--plain writes vLLM's own LLaVA" in capsys.readouterr().err


def test_bench_vllm_table_compares_each_row_the_right_way_round():
    from vlmzip.serving.bench_vllm import VARIANTS, format_table

    plain = {
        "prompt_tokens_per_request": 600, "completion_tokens_per_request": 16, "requests_per_s": 1.0,
        "output_tokens_per_s": 16.0, "ttft_mean_s": 2.0, "ttft_median_s": 1.0, "batch_s": 16.0,
        "startup_s": 10.0, "requests": 16, "load_average": [1.0, 2.0],
    }  # fmt: skip
    plugin = {**plain, "prompt_tokens_per_request": 88, "requests_per_s": 2.3, "ttft_mean_s": 0.5}
    lines = format_table({VARIANTS[0]: plain, VARIANTS[1]: plugin}, VisionZipConfig()).splitlines()
    assert next(line for line in lines if line.startswith("requests / s")).endswith("2.30x faster")
    assert next(line for line in lines if line.startswith("prompt tokens / request")).endswith("6.82x fewer")
    assert next(line for line in lines if line.startswith("TTFT mean")).endswith("4.00x faster")
    assert next(line for line in lines if line.startswith("generated tokens")).endswith("same on both")
    assert "16 concurrent requests" in lines[-1] and "1.0-2.0" in lines[-1]


def test_visionzip_overrides_on_a_model_the_plugin_does_not_serve_are_refused(tiny_dir, tmp_path):
    from vlmzip.serving.settings import check_overrides_target, requested_from_argv

    plain, zipped = tmp_path / "plain", tmp_path / "zipped"
    export_model(tiny_dir, plain, plugin=False)
    export_model(tiny_dir, zipped, VisionZipConfig())
    budget = '{"visionzip": {"dominant": 20, "contextual": 4}}'
    for overrides in (budget, json.loads(budget)):
        with pytest.raises(ValueError, match=r"\['LlavaForConditionalGeneration'\].*every visual token"):
            check_overrides_target(str(plain), overrides)
        check_overrides_target(str(zipped), overrides)  # the plugin's architecture: fine
    check_overrides_target(str(plain), '{"max_position_embeddings": 4096}')  # no VisionZip key: not ours
    check_overrides_target(str(plain), {**json.loads(budget), "architectures": [ARCHITECTURE]})
    with pytest.warns(UserWarning, match="not known here"):
        check_overrides_target("llava-hf/llava-1.5-7b-hf", budget)
    assert requested_from_argv(["vllm", "serve", str(plain), "--hf-overrides", budget]) == (str(plain), budget)
    assert requested_from_argv(["vllm", "serve", "--model", "m", f"--hf-overrides={budget}"]) == ("m", budget)
    assert requested_from_argv(["python", "script.py"]) == (None, None)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"positions": "original"}, r"positions='original' is not available in vLLM serving"),
        ({"attention_mass": 0.5}, r"attention_mass \(adaptive budget\) is not available in vLLM serving"),
    ],
)
def test_fields_the_runner_does_not_implement_are_refused(exported, fields, match):
    with pytest.raises(ValueError, match=match):
        check_servable(hf_config(exported), VisionZipConfig(**fields))


def test_a_bad_position_scheme_in_the_overrides_is_named(exported):
    config = hf_config(exported)
    config.visionzip = {"positions": "sparse"}
    with pytest.raises(ValueError, match=r"positions must be one of \('compact', 'original'\)"):
        resolve_config(exported, config)


def test_export_of_qwen3_vl_names_the_plugin_class(tmp_path):
    from vlmzip.serving.settings import QWEN3_VL_ARCHITECTURE
    from vlmzip.serving.tiny import build_tiny_qwen3_vl

    source = build_tiny_qwen3_vl(tmp_path / "tiny")
    budget = VisionZipConfig(dominant=8, contextual=2)
    export_model(source, tmp_path / "out", budget)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["architectures"] == [QWEN3_VL_ARCHITECTURE]
    assert config["model_type"] == "qwen3_vl"
    assert json.loads((tmp_path / "out" / CONFIG_FILENAME).read_text()) == budget.to_dict()
    source_tensors, target = tensors(source), tensors(tmp_path / "out")
    assert source_tensors.keys() == target.keys()  # vLLM maps transformers' Qwen3-VL names itself
    assert any("deepstack_merger_list" in name for name in target)
    export_model(source, tmp_path / "plain", plugin=False)
    plain = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert plain["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert not (tmp_path / "plain" / CONFIG_FILENAME).exists()
    hf_config = AutoConfig.from_pretrained(tmp_path / "out")
    with pytest.raises(ValueError, match="feature_layer: Qwen3-VL's visual tokens"):
        check_servable(hf_config, VisionZipConfig(dominant=8, contextual=2, feature_layer=-2))
