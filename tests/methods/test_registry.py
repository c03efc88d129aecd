"""The method registry's two kinds: before the language model (reduction functions) and inside it (FastV)."""

from __future__ import annotations

import pytest

import vlmzip
from conftest import make_llava, make_qwen2_vl
from vlmzip import methods
from vlmzip.cli_options import methods_for
from vlmzip.methods import BEFORE_LLM, INSIDE_LLM, all_methods, available_methods, get_method, get_pruner, method_kind
from vlmzip.methods.fastv import FastV
from vlmzip.variants import Variant, VariantRunner, build_variants


def test_two_kinds_from_one_registry():
    before, inside = available_methods(), available_methods(INSIDE_LLM)
    assert "visionzip" in before and "fastv" not in before
    assert inside == ("fastv",)
    assert all_methods() == (*before, *inside)
    assert available_methods(BEFORE_LLM) == before
    assert method_kind("visionzip") == BEFORE_LLM and method_kind("fastv") == INSIDE_LLM
    assert get_pruner("fastv") is FastV
    assert callable(get_method("pool"))


def test_each_lookup_refuses_the_other_kind():
    with pytest.raises(ValueError, match="method must be one of"):
        get_method("fastv")
    with pytest.raises(ValueError, match="method must be one of"):
        get_pruner("visionzip")
    with pytest.raises(ValueError, match="method must be one of"):
        method_kind("nope")
    with pytest.raises(ValueError, match="kind must be one of"):
        available_methods("after_llm")
    with pytest.raises(ValueError, match="kind must be one of"):
        methods.register_method("x", kind="after_llm")
    with pytest.raises(ValueError, match="already registered"):
        methods.register_method("fastv", kind=INSIDE_LLM)(FastV)
    with pytest.raises(ValueError, match="method must be one of"):
        vlmzip.VisionZipConfig(dominant=4, contextual=1, method="fastv")  # a config names a pre-LLM method only


def test_variants_and_cli_choices_follow_the_registry():
    variants = build_variants(all_methods(), [8])
    assert [v.method for v in variants] == ["full", *all_methods()]
    assert [v.inside_llm for v in variants] == [False] + [m in available_methods(INSIDE_LLM) for m in all_methods()]
    assert VariantRunner.needs_unit_tokens(variants) and not VariantRunner.needs_unit_tokens(variants[:2])
    llava, qwen = make_llava(), make_qwen2_vl()
    assert methods_for(llava, None) == list(all_methods())
    assert methods_for(qwen, None) == list(available_methods())  # M-RoPE: the inside-LLM method is left out
    with pytest.raises(ValueError, match="--methods fastv"):
        methods_for(qwen, ["visionzip", "fastv"])


def test_runner_builds_the_registered_pruner():
    model = make_llava()
    runner = VariantRunner(model, Variant("fastv", 8), unit_tokens=17)
    assert isinstance(runner.pruner, FastV) and runner.adapter is None and not runner.reduces_before_llm
    assert runner.pruner.tokens == 8 and runner.pruner.image_tokens == 17
    with pytest.raises(ValueError, match="unit_tokens is required for fastv"):
        VariantRunner(model, Variant("fastv", 8))
    reduced = VariantRunner(model, Variant("pool", 4))
    assert reduced.pruner is None and reduced.reduces_before_llm
