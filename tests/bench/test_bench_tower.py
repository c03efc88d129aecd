"""`vlmzip bench-tower`: the vision tower timed three ways on the tiny CLIP tower, labelled and positive."""

from __future__ import annotations

import re

import pytest
import torch

from vlmzip.api import compress_vision
from vlmzip.bench.tower import build_tower, eager_route, main
from vlmzip.cli import main as cli_main

ROUTES = ("plain", "visionzip", "eager")
NUMBER = r"(\d+\.\d+)"


def test_bench_tower_prints_positive_labelled_times(capsys):
    assert cli_main(["bench-tower", "--batch", "1", "--repeats", "2", "--dominant", "20", "--contextual", "4"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("tower=tiny batch=1 dtype=float32 repeats=2 ") and "budget=20+4" in lines[0]
    assert lines[1].split() == [
        "route",
        "median",
        "ms",
        "min",
        "ms",
        "max",
        "ms",
        "vs",
        "plain",
        "CPU",
        "ms",
        "CPU",
        "vs",
        "plain",
    ]
    rows = {}
    for line in lines[2:5]:
        match = re.fullmatch(rf"(\w+)\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}x\s+{NUMBER}\s+{NUMBER}x", line)
        assert match, line
        rows[match[1]] = [float(value) for value in match.groups()[1:]]
    assert tuple(rows) == ROUTES
    for median, low, high, ratio, cpu, cpu_ratio in rows.values():
        assert 0 < low <= median <= high and ratio > 0 and cpu > 0 and cpu_ratio > 0
    assert rows["plain"][3] == 1.0 and rows["plain"][5] == 1.0
    summary = re.fullmatch(rf"visionzip / plain = {NUMBER} \(CPU {NUMBER}\)\s+eager / visionzip = {NUMBER}", lines[5])
    assert summary and all(float(value) > 0 for value in summary.groups())


def test_python_m_entry_point_is_the_same_command(capsys):
    assert main(["--batch", "1", "--repeats", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[0] == "route"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch", "0"], "--batch and --repeats must be >= 1"),
        (["--repeats", "0"], "--batch and --repeats must be >= 1"),
        (["--warmup", "-1"], "--warmup >= 0"),
        (["--tower", "huge"], "invalid choice"),
    ],
)
def test_bad_arguments_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        cli_main(["bench-tower", *argv])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_budget_is_a_one_line_error(capsys):
    assert cli_main(["bench-tower", "--dominant", "0", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("vlmzip bench-tower: error: ") and "dominant" in err and "Traceback" not in err


def test_the_eager_route_reduces_like_compress_vision():
    # The timed routes compute the same thing: the reference (attention maps) and the probe agree.
    tower = build_tower("tiny", torch.float32)
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probe = compress_vision(tower, pixels, 20, 4).features
        tower.set_attn_implementation("eager")
        reference = eager_route(tower, pixels, 20, 4)
    torch.testing.assert_close(probe, reference, rtol=1e-4, atol=1e-4)
