"""`vlmzip eval` end to end on a tiny local model: results file, resuming, plots and errors."""

from __future__ import annotations

import json
import re

import pytest

from bench.tiny_model import save_tiny_llava
from eval.tiny_data import write_vqa
from vlmzip.cli import main

PROMPT = "USER: <image> {question} ASSISTANT:"


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    model = save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))
    data = write_vqa(tmp_path_factory.mktemp("vqa"), images=2)
    return model, data


def run(paths, out, *extra):
    model, data = paths
    argv = ["eval", "--model", str(model), "--data", str(data), "--prompt", PROMPT, "--max-new-tokens", "2"]
    return main([*argv, "--batch-size", "4", "--json", str(out), *extra])


def test_results_resume_and_plot(paths, tmp_path, capsys, monkeypatch):
    # A narrow terminal: status lines that hold a path must still come out whole.
    monkeypatch.setenv("COLUMNS", "40")
    out, picture = tmp_path / "eval.json", tmp_path / "eval.png"
    assert run(paths, out, "--methods", "visionzip", "--tokens", "64") == 0
    first = json.loads(out.read_text())
    assert [(r["method"], r["tokens"]) for r in first["results"]] == [("full", 576), ("visionzip", 64)]
    row = first["results"][1]
    assert {"method", "tokens", "accuracy", "retention", "n", "per_type", "per_type_n"} <= row.keys()
    assert row["n"] == 6 and set(row["per_type"]) == {"what", "count"}
    assert first["settings"]["n"] == 6 and first["settings"]["prompt"] == PROMPT
    capsys.readouterr()

    # A rerun with one more method evaluates only that one and keeps the earlier rows as they were.
    assert run(paths, out, "--methods", "visionzip", "pool", "--tokens", "64", "--plot", str(picture)) == 0
    captured = capsys.readouterr()
    assert "2 of 3 already done" in captured.err
    second = json.loads(out.read_text())
    assert second["results"][:2] == first["results"]
    assert [r["method"] for r in second["results"]] == ["full", "visionzip", "pool"]
    assert "pool" in captured.out and picture.stat().st_size > 1000


def test_other_settings_are_refused_unless_overwritten(paths, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert run(paths, out, "--methods", "random", "--tokens", "32") == 0
    assert run(paths, out, "--methods", "random", "--tokens", "32", "--max-new-tokens", "3") == 2
    assert "different settings (max_new_tokens)" in capsys.readouterr().err
    assert run(paths, out, "--methods", "random", "--tokens", "32", "--max-new-tokens", "3", "--overwrite") == 0
    assert json.loads(out.read_text())["settings"]["max_new_tokens"] == 3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "nope"], "methods must be among"),
        (["--tokens", "0"], "budget"),
        (["--batch-size", "0"], "--batch-size"),
        (["--prompt", "no placeholder"], r"--prompt must contain \{question\}"),
        (["--plot", "x.pdf"], r"--plot must name a \.png file"),
    ],
)
def test_bad_arguments_exit_2(paths, tmp_path, capsys, extra, message):
    assert run(paths, tmp_path / "eval.json", *extra) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("vlmzip eval: error: ") and re.search(message, error), error


def test_model_without_data_and_bad_results_file(paths, tmp_path, capsys):
    model, _ = paths
    assert main(["eval", "--model", str(model), "--json", str(tmp_path / "x.json")]) == 2
    assert "--data is required with --model" in capsys.readouterr().err
    # a mistyped directory is named as such, not as a missing --data
    assert main(["eval", "--model", str(tmp_path / "typo"), "--json", str(tmp_path / "x.json")]) == 2
    assert "--model: model directory not found: " + str(tmp_path / "typo") in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text("[1, 2]")
    assert run(paths, broken, "--methods", "random", "--tokens", "32") == 2
    assert "not a results file" in capsys.readouterr().err


def test_a_model_built_from_the_embedded_recipe_defaults_to_its_held_out_split(paths, tmp_path):
    import shutil

    model, _ = paths
    built = tmp_path / "rebuilt"
    shutil.copytree(model, built)
    # What assemble_model_dir writes beside the weights: its fingerprint and the run's metadata (seed 4).
    (built / "visionzip_fingerprint.txt").write_text("0123456789abcdef\n")
    (built / "training_metadata.json").write_text(json.dumps({"seed": 4, "settings": {}}))
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(built), "--limit", "5", "--prompt", PROMPT, "--max-new-tokens", "2"]
    assert main([*argv, "--methods", "random", "--tokens", "32", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["settings"]["data"] == "embedded held-out split (seed 4, first 5 questions)"
    assert [r["n"] for r in result["results"]] == [5, 5]


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"visionzip_fingerprint.txt": "x", "training_metadata.json": '{"seed": 3}'}, 3),
        ({"training_metadata.json": '{"seed": 3}'}, None),  # not written by assemble_model_dir
        ({"visionzip_fingerprint.txt": "x"}, None),
        ({"visionzip_fingerprint.txt": "x", "training_metadata.json": "not json"}, None),
        ({"visionzip_fingerprint.txt": "x", "training_metadata.json": "[3]"}, None),
        ({"visionzip_fingerprint.txt": "x", "training_metadata.json": '{"seed": -1}'}, None),
        ({"visionzip_fingerprint.txt": "x", "training_metadata.json": '{"seed": true}'}, None),
        ({"visionzip_fingerprint.txt": "x", "training_metadata.json": '{"seed": "0"}'}, None),
    ],
)
def test_assembled_seed_reads_only_what_assemble_model_dir_writes(tmp_path, files, expected):
    from vlmzip.default_model.build import assembled_seed

    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert assembled_seed(tmp_path) == expected
    assert assembled_seed(tmp_path / "missing") is None


def test_cache_choices_give_the_same_results(paths, tmp_path):
    rows = {}
    for name, extra in {
        "memory": [],
        "disk": ["--cache-dir", str(tmp_path / "cache")],
        "none": ["--no-cache"],
    }.items():
        out = tmp_path / f"{name}.json"
        assert run(paths, out, "--methods", "visionzip", "--tokens", "64", *extra) == 0
        rows[name] = json.loads(out.read_text())["results"]
    assert rows["memory"] == rows["disk"] == rows["none"]
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2  # one per image
    out = tmp_path / "int8.json"
    assert run(paths, out, "--methods", "visionzip", "--tokens", "64", "--quantize", "int8") == 0
    assert json.loads(out.read_text())["settings"]["quantize"] == "int8"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--cache-mb", "-1"], "--cache-mb"),
        (["--no-cache", "--cache-dir", "x"], "--no-cache or --cache-dir"),
    ],
)
def test_bad_cache_arguments(paths, tmp_path, capsys, extra, message):
    assert run(paths, tmp_path / "x.json", *extra) == 2
    assert message in capsys.readouterr().err
