"""No command writes over its own inputs, and results appear whole or not at all (vlmzip.outputs)."""

from __future__ import annotations

import json
import os

import pytest

from conftest import random_images
from eval.tiny_data import write_vqa
from vlmzip.cli import main
from vlmzip.default_model import files_dir
from vlmzip.outputs import refuse_overlap, replacing_directory, replacing_file


def snapshot(folder):
    return sorted((str(p.relative_to(folder)), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


@pytest.fixture
def model_dir(tmp_path):
    """Stands for a model directory: the refusals come before anything is loaded."""
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


@pytest.fixture
def data(tmp_path):
    return write_vqa(tmp_path / "vqa", images=2)


def test_refuse_overlap(tmp_path, model_dir):
    image = tmp_path / "photo.png"
    random_images(1)[0].save(image)
    inputs = [("--model", model_dir), ("--image", image), ("--data", None)]
    (tmp_path / "alias").symlink_to(model_dir)
    os.link(image, tmp_path / "hard.png")
    for output, relation in [
        (model_dir, "is"),
        (tmp_path / "alias", "is"),  # the same directory under another name
        (tmp_path / "alias" / "out", "is inside"),
        (model_dir / "sub" / "out.png", "is inside"),
        (tmp_path, "contains"),
        (image, "is"),
        (tmp_path / "hard.png", "is"),  # a hard link of the image
        (tmp_path / ".." / tmp_path.name / "photo.png", "is"),
    ]:
        with pytest.raises(ValueError, match=rf"-o/--output .* {relation} the input"):
            refuse_overlap(output, inputs)
    assert refuse_overlap(tmp_path / "elsewhere", inputs) == tmp_path / "elsewhere"
    assert refuse_overlap(tmp_path / "model-2", inputs) == tmp_path / "model-2"  # a shared prefix is not inside


def test_replacing_directory_and_file(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), replacing_directory(target) as staging:
        (staging / "new.txt").write_text("half")
        raise KeyboardInterrupt
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (target / "old.txt").read_text() == "old"
    with replacing_directory(target) as staging:
        (staging / "new.txt").write_text("new")
    assert [p.name for p in target.iterdir()] == ["new.txt"] and [p.name for p in tmp_path.iterdir()] == ["out"]

    file = tmp_path / "results.json"
    file.write_text("old")
    with pytest.raises(RuntimeError), replacing_file(file) as temporary:
        temporary.write_text("half")
        raise RuntimeError("disk full")
    assert file.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "results.json"]
    with replacing_file(file) as temporary:
        temporary.write_text("new")
    assert file.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["out", "results.json"]


def test_show_and_demo_refuse_to_draw_over_the_image(tmp_path, capsys):
    image = tmp_path / "photo.png"
    random_images(1)[0].save(image)
    before = image.read_bytes()
    assert main(["show", "--image", str(image), "-o", str(image)]) == 2
    assert "-o/--output" in capsys.readouterr().err
    assert main(["demo", "--image", str(image), "--question", "what ?", "-o", str(image)]) == 2
    assert "is the input --image" in capsys.readouterr().err
    assert image.read_bytes() == before


def test_eval_and_bench_refuse_outputs_over_their_inputs(tmp_path, model_dir, data, capsys):
    before = snapshot(model_dir), snapshot(data.parent)
    image = data.parent / "image_0.png"
    cases = [
        ["eval", "--model", str(model_dir), "--data", str(data), "--json", str(model_dir / "results.json")],
        ["eval", "--model", str(model_dir), "--data", str(data), "--plot", str(image)],  # an image the data names
        ["eval", "--data", str(data), "--json", str(files_dir() / "results.json")],  # the embedded model
        ["bench", "--model", str(model_dir), "--json", str(model_dir / "bench.json")],
        ["bench", "--model", str(model_dir), "--image", str(image), "--plot", str(image)],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        error = capsys.readouterr().err
        assert "the input" in error and "Traceback" not in error, (argv, error)
    assert (snapshot(model_dir), snapshot(data.parent)) == before


def test_export_split_asks_before_replacing_and_refuses_no_scenes(tmp_path, capsys):
    out = tmp_path / "split.jsonl"
    for images in ("0", "-3"):
        with pytest.raises(SystemExit) as stop:
            main(["export-split", str(out), "--images", images])
        assert stop.value.code == 2
        assert f"--images must be an integer >= 1, got {images}" in capsys.readouterr().err
    assert not out.exists()
    assert main(["export-split", str(out), "--images", "2", "--split", "val"]) == 0
    first = out.read_text()
    (tmp_path / "split_images" / "extra.png").write_bytes(b"not from this export")
    out.write_text("my own edits\n")
    assert main(["export-split", str(out), "--images", "1"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert out.read_text() == "my own edits\n"
    assert main(["export-split", str(out), "--images", "2", "--split", "val", "--overwrite"]) == 0
    assert out.read_text() == first
    assert sorted(p.name for p in (tmp_path / "split_images").iterdir()) == ["00000.png", "00001.png"]
    assert all((tmp_path / json.loads(line)["image"]).is_file() for line in first.splitlines())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["split.jsonl", "split_images"]


def test_training_recipe_refuses_the_shipped_weights(capsys):
    from recipes.default_model import train

    before = snapshot(files_dir())
    for argv in ([str(files_dir())], [str(files_dir().parent)], ["elsewhere", "--work-dir", str(files_dir())]):
        with pytest.raises(SystemExit) as stop:
            train.main(argv)
        assert stop.value.code == 2
        assert "the input embedded default model" in capsys.readouterr().err
    assert snapshot(files_dir()) == before


def test_bench_vllm_refuses_outputs_in_the_model(model_dir, capsys):
    from vlmzip.serving.bench_vllm import main as bench_vllm

    assert bench_vllm(["--model", str(model_dir), "--output", str(model_dir / "bench.json")]) == 2
    assert bench_vllm(["--model", str(model_dir), "--logs", str(model_dir)]) == 2
    assert capsys.readouterr().err.count("the input --model") == 2
