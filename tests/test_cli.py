"""The command line: help, info, and one-line errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vlmzip import __version__
from vlmzip.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert __version__ in out
    assert "LlavaForConditionalGeneration" in out
    assert "transformers" in out and "torch" in out


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


def test_train_default_hands_its_arguments_to_its_own_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-default", "--help"])
    assert exit_info.value.code == 0
    assert "--seed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "-3"], "--steps must be >= 1, got -3"),
        (["--train-images", "2"], "--train-images must be >= 8 (scenes per training step), got 2"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--precision", "half"], "argument --precision: invalid choice: 'half'"),
    ],
)
def test_train_default_refuses_bad_values_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["train-default", str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_default_refuses_emulated_bfloat16_before_any_work(tmp_path, capsys, monkeypatch):
    from vlmzip.default_model import train

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        main(["train-default", str(tmp_path / "out"), "--precision", "bfloat16"])
    assert exit_info.value.code == 2
    assert "precision='bfloat16' needs a CPU that computes bfloat16 natively" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_default_and_export_split_are_listed(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "train-default" in out and "export-split" in out
