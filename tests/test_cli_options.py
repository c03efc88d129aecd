"""The command-line options every command shares: one budget, methods x budgets, devices, model loading."""

from __future__ import annotations

import argparse

import pytest

from conftest import make_llava, make_qwen2_vl
from vlmzip.cli import UserError, build_parser, main
from vlmzip.cli_options import (
    add_budget_options,
    add_variant_options,
    budget_from_args,
    check_device,
    config_from_args,
    load_model_for_cli,
    methods_for,
    variants_from_args,
)
from vlmzip.methods import available_methods


def parse_budget(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_budget_options(parser)
    return parser.parse_args(argv)


def parse_variants(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_variant_options(parser, methods_help="methods", tokens_help="tokens")
    return parser.parse_args(argv)


@pytest.mark.parametrize(
    ("argv", "budget", "split"),
    [
        ((), 64, (54, 10)),
        (("--tokens", "128"), 128, (108, 20)),
        (("--tokens", "10"), 10, (8, 2)),
        (("--dominant", "8", "--contextual", "0"), (8, 0), (8, 0)),
    ],
)
def test_one_budget(argv, budget, split):
    args = parse_budget(*argv, "--method", "pool")
    assert budget_from_args(args) == budget
    config = config_from_args(args)
    assert (config.dominant, config.contextual, config.method) == (*split, "pool")


@pytest.mark.parametrize(
    ("argv", "error", "message"),
    [
        (("--tokens", "0"), ValueError, "tokens must be an integer >= 1, got 0"),
        (("--dominant", "0", "--contextual", "1"), ValueError, "dominant must be an integer >= 1"),
        (("--dominant", "4", "--contextual", "-1"), ValueError, "contextual must be an integer >= 0"),
        (("--tokens", "64", "--dominant", "3"), ValueError, "give either --tokens or --dominant/--contextual"),
        (("--contextual", "3"), ValueError, "--dominant and --contextual must be given together"),
        (("--method", "magic"), ValueError, "method must be one of"),
    ],
)
def test_one_budget_errors(argv, error, message):
    with pytest.raises(error, match=message):
        config_from_args(parse_budget(*argv))


def test_every_budget_command_parses_alike():
    parser = build_parser()
    for command in (["demo"], ["show", "--image", "x.png", "-o", "y.png"]):
        args = parser.parse_args([*command, "--dominant", "20", "--contextual", "4", "--method", "random"])
        assert (config_from_args(args).tokens, config_from_args(args).method) == (24, "random")
    for command in (["bench"], ["eval"]):
        args = parser.parse_args([*command, "--methods", "pool", "fastv", "--tokens", "32", "16"])
        labels = [variant.label for variant in variants_from_args(args, (192,))]
        assert labels == ["full", "pool@32", "pool@16", "fastv@32", "fastv@16"]


def test_demo_refuses_half_a_split_before_loading(capsys):
    assert main(["demo", "--dominant", "8"]) == 2
    assert "--dominant and --contextual must be given together" in capsys.readouterr().err


def test_variants_default_budgets_and_checks():
    variants = variants_from_args(parse_variants("--methods", "visionzip"), (64, 32))
    assert [(variant.method, variant.budget) for variant in variants] == [
        ("full", None),
        ("visionzip", 64),
        ("visionzip", 32),
    ]
    with pytest.raises(ValueError, match="methods must be among"):
        variants_from_args(parse_variants("--methods", "nope"), (64,))
    with pytest.raises(ValueError, match="budget must be an integer >= 1"):
        variants_from_args(parse_variants("--tokens", "0"), (64,))


def test_methods_follow_the_model(capsys):
    from rich.console import Console

    llava, qwen = make_llava(), make_qwen2_vl()
    assert methods_for(llava, None) == [*available_methods(), "fastv"]
    console = Console(stderr=True)
    assert methods_for(qwen, None, console) == list(available_methods())  # FastV left out, said once
    assert "fastv left out" in capsys.readouterr().err
    assert methods_for(qwen, ["pool"]) == ["pool"]
    with pytest.raises(ValueError, match="--methods fastv: .*M-RoPE"):
        methods_for(qwen, ["pool", "fastv"])
    variants = variants_from_args(parse_variants("--tokens", "16"), (64,), qwen, console)
    assert [variant.method for variant in variants] == ["full", *available_methods()]


def test_device_and_model_errors(tmp_path, monkeypatch):
    import torch

    assert check_device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--device cuda:1: CUDA is not available"):
            check_device("cuda:1")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model_for_cli(str(tmp_path / "missing"))

    def missing(model=None, *, dtype=None):
        raise ImportError("no weights")

    monkeypatch.setattr("vlmzip.loading.load_model", missing)
    with pytest.raises(UserError, match=r"default model is not available \(no weights\); pass --model DIR or --arch"):
        load_model_for_cli(None, alternatives="--model DIR or --arch NAME")
