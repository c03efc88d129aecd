"""Adaptive budgets (VisionZipConfig.attention_mass): each image, crop or frame chooses its dominant count."""

from __future__ import annotations

import argparse

import pytest
import torch

import vlmzip
from conftest import IMAGE_TOKEN_ID, make_llava, make_llava_processor, random_images
from families import FAMILIES, make_llava_next, make_llava_next_processor
from helpers import assert_batch_equals_singles
from vlmzip.cli_options import add_budget_options, add_variant_options, config_from_args, variants_from_args
from vlmzip.config import VisionZipConfig
from vlmzip.core import adaptive_dominant
from vlmzip.probe import probe_vision_tower
from vlmzip.variants import build_variants

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:"] * 2


def test_adaptive_dominant_counts_tokens_until_the_mass_is_reached():
    scores = torch.tensor([[0.5, 0.1, 0.3, 0.1], [0.25, 0.25, 0.25, 0.25]])
    assert adaptive_dominant(scores, 0.5, has_cls=True).tolist() == [2, 3]  # [CLS] + 1 patch; [CLS] + 2 patches
    assert adaptive_dominant(scores, 0.8, has_cls=True).tolist() == [3, 5]
    assert adaptive_dominant(scores, 1.0, has_cls=True).tolist() == [5, 5]
    assert adaptive_dominant(scores, 0.5, has_cls=False).tolist() == [1, 2]
    assert adaptive_dominant(scores, 0.8, has_cls=True, minimum=4, maximum=4).tolist() == [4, 4]
    assert adaptive_dominant(torch.zeros(1, 4), 0.5, has_cls=True).tolist() == [2]  # no attention: one token


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"attention_mass": 0}, ValueError, r"attention_mass must be a number in \(0, 1\], got 0.0"),
        ({"attention_mass": 1.5}, ValueError, r"attention_mass must be a number in \(0, 1\]"),
        ({"attention_mass": float("nan")}, ValueError, r"attention_mass must be a number in \(0, 1\]"),
        ({"attention_mass": True}, TypeError, "attention_mass must be a number"),
        ({"attention_mass": "0.5"}, TypeError, "attention_mass must be a number"),
        ({"attention_mass": 0.5, "min_dominant": 0}, ValueError, r"min_dominant must be an integer >= 1"),
        ({"attention_mass": 0.5, "min_dominant": 8, "max_dominant": 4}, ValueError, r"max_dominant must be .* >= 8"),
        ({"attention_mass": 0.5, "max_dominant": 2.5}, TypeError, "max_dominant must be an integer"),
        ({"attention_mass": 0.5, "method": "pool"}, ValueError, "does not apply to method 'pool'"),
        ({"attention_mass": 0.5, "budget_scope": "per_image"}, ValueError, "needs budget_scope='per_crop'"),
        ({"attention_mass": 0.5, "temporal_threshold": 0.9}, ValueError, "cannot be combined"),
    ],
)
def test_bad_adaptive_fields_are_named(fields, error, match):
    with pytest.raises(error, match=match):
        VisionZipConfig(**fields)


def expected_counts(model, pixel_values, config):
    probe = probe_vision_tower(model.model.vision_tower, pixel_values, -2)
    maximum = probe.features.shape[1] - config.contextual
    if config.max_dominant is not None:
        maximum = min(maximum, config.max_dominant)
    counts = adaptive_dominant(probe.scores, config.attention_mass, minimum=config.min_dominant, maximum=maximum)
    return (counts + config.contextual).tolist()


@pytest.mark.parametrize("method", ["visionzip", "visionzip-dominant", "random", "divprune", "tome"])
def test_llava_images_get_their_own_lengths(method):
    processor, model = make_llava_processor(), make_llava()
    images = random_images(2, seed=1) + [random_images(1, seed=2, size=(40, 40))[0].resize((300, 400))] * 2
    inputs = dict(processor(text=PROMPTS, images=images, return_tensors="pt", padding=True))
    config = VisionZipConfig(contextual=3, attention_mass=0.3, method=method)
    vlmzip.apply(model, config)
    prepared = vlmzip.prepare(model, inputs)
    counts = (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    expected = expected_counts(model, inputs["pixel_values"], config)
    assert counts == expected
    assert len(set(counts)) > 1  # the images differ: the batch is re-padded to mixed lengths
    assert [f.shape[0] for f in prepared["mm_encoder_outputs"]["image"].pooler_output] == expected
    if method != "random":  # random draws per batch
        pairs = zip(PROMPTS, images, strict=True)
        singles = [dict(processor(text=[p], images=[im], return_tensors="pt")) for p, im in pairs]
        assert_batch_equals_singles(model, inputs, singles)


def test_clamping_and_original_positions_together():
    processor, model = make_llava_processor(), make_llava()
    images = random_images(2, seed=1)
    inputs = dict(processor(text=PROMPTS[:2], images=images, return_tensors="pt", padding=True))
    config = VisionZipConfig(contextual=2, attention_mass=0.9, min_dominant=3, max_dominant=6, positions="original")
    vlmzip.apply(model, config)
    prepared = vlmzip.prepare(model, inputs)
    counts = (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1)
    assert bool(((counts >= 5) & (counts <= 8)).all())
    assert prepared["position_ids"].shape == prepared["input_ids"].shape


def test_llava_next_crops_choose_their_own_counts():
    processor, model = make_llava_next_processor(), make_llava_next()
    sizes = [(150, 300), (200, 700)]
    images = [random_images(1, seed=i, size=s)[0] for i, s in enumerate(sizes)]
    inputs = dict(processor(text=PROMPTS[:2], images=images, return_tensors="pt", padding=True))
    config = VisionZipConfig(contextual=2, attention_mass=0.2, positions="original")
    vlmzip.apply(model, config)
    prepared = vlmzip.prepare(model, inputs)
    reductions = vlmzip.api.get_state(model).adapter.last_encoded.reductions
    per_crop = [r.features.shape[1] for r in reductions]
    assert len(per_crop) == 3 + 4 and len(set(per_crop)) > 1
    counts = (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist()
    assert counts == [sum(per_crop[:3]), sum(per_crop[3:])]
    pairs = zip(PROMPTS[:2], images, strict=True)
    singles = [dict(processor(text=[p], images=[im], return_tensors="pt")) for p, im in pairs]
    assert_batch_equals_singles(model, inputs, singles)


def test_budget_check_uses_the_fewest_tokens():
    with pytest.raises(ValueError, match=r"min_dominant \+ contextual must be <= 576 \(the placeholders"):
        vlmzip.apply(make_llava(), VisionZipConfig(contextual=10, attention_mass=0.5, min_dominant=570))


# --- command line and variants ------------------------------------------------------------------------------
def test_cli_options_build_adaptive_configs():
    parser = argparse.ArgumentParser()
    add_budget_options(parser)
    args = parser.parse_args(
        ["--tokens", "64", "--attention-mass", "0.6", "--max-dominant", "40", "--positions", "original"]
    )
    config = config_from_args(args)
    assert (config.contextual, config.attention_mass, config.max_dominant, config.positions) == (
        10,
        0.6,
        40,
        "original",
    )
    with pytest.raises(ValueError, match="--min-dominant and --max-dominant apply to adaptive budgets"):
        config_from_args(parser.parse_args(["--max-dominant", "40"]))
    with pytest.raises(ValueError, match=r"attention_mass must be a number in \(0, 1\]"):
        config_from_args(parser.parse_args(["--attention-mass", "0"]))


def test_variants_add_adaptive_ones_for_the_methods_that_take_them():
    parser = argparse.ArgumentParser()
    add_variant_options(parser, methods_help="m", tokens_help="t")
    args = parser.parse_args(
        ["--methods", "visionzip", "pool", "fastv", "--tokens", "64", "--attention-mass", "0.5", "0.8"]
    )
    variants = variants_from_args(args, (64,))
    labels = [v.label for v in variants]
    assert labels == ["full", "visionzip@64", "pool@64", "fastv@64", "visionzip@64 p=0.5", "visionzip@64 p=0.8"]
    with pytest.raises(ValueError, match="attention_mass .* applies to the pre-LLM methods other than"):
        build_variants(["pool"], [64], attention_masses=[0.5])
    assert {v.positions for v in build_variants(["visionzip"], [64], positions="original")} == {"compact", "original"}


def test_show_draws_an_adaptive_budget():
    from vlmzip.viz import reduce_image, token_summary

    config = VisionZipConfig(contextual=3, attention_mass=0.3)
    image = random_images(1, seed=1)[0]
    panels = reduce_image(make_llava(), make_llava_processor(), image, config)
    pixel_values = make_llava_processor()(text=[PROMPTS[0]], images=[image], return_tensors="pt")["pixel_values"]
    (expected,) = expected_counts(make_llava(), pixel_values, config)
    assert f"{expected}" in token_summary(panels)


@pytest.mark.parametrize("family", ["llava-next", "smolvlm"])
def test_show_draws_an_adaptive_budget_crop_by_crop(family):
    """Each crop's panel holds the count that crop chose inside the model, labelled as the crop."""
    from vlmzip.viz import reduce_image, visualize

    spec = FAMILIES[family]
    model, processor = spec.make_model(), spec.make_processor()
    config = VisionZipConfig(contextual=2, attention_mass=0.3)
    image = random_images(1, seed=1, size=(200, 500))[0]
    panels = reduce_image(model, processor, image, config)
    vlmzip.apply(model, config)
    vlmzip.prepare(model, dict(processor(images=spec.images([[image]]), text=[spec.prompt(1)], return_tensors="pt")))
    chosen = [r.features.shape[1] for r in vlmzip.api.get_state(model).adapter.last_encoded.reductions]
    assert len(panels) == len(chosen) > 1
    assert [panel.kept_tokens for panel in panels] == chosen
    assert len({panel.label for panel in panels}) == len(panels)  # every crop captioned apart
    assert visualize(panels).size[0] > 0


@pytest.mark.parametrize("family", ["llava-next", "llava-onevision"])
def test_an_adaptive_anyres_image_never_gets_more_tokens_than_its_placeholders(family):
    """A narrow image: unpadding (OneVision also downscales) leaves it fewer placeholders than crops x tokens
    per crop. Even at attention_mass 1 it gets at most placeholders // crops tokens per crop."""
    spec = FAMILIES[family]
    processor, model = spec.make_processor(), spec.make_model()
    inputs = dict(
        processor(images=[random_images(1, seed=1, size=(40, 700))[0]], text=[spec.prompt(1)], return_tensors="pt")
    )
    placeholders = int((inputs["input_ids"] == spec.image_token_id).sum())
    vlmzip.apply(model, contextual=2, attention_mass=1.0, positions="original")
    prepared = vlmzip.prepare(model, inputs)
    reductions = vlmzip.api.get_state(model).adapter.last_encoded.reductions
    share = placeholders // len(reductions)
    assert len(reductions) > 1 and share < reductions[0].groups.shape[1]  # the cap binds
    assert max(r.features.shape[1] for r in reductions) == share
    assert int((prepared["input_ids"] == spec.image_token_id).sum()) <= placeholders
    with torch.no_grad():
        assert model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0).shape[1] > 0
    vlmzip.remove(model)
    vlmzip.apply(model, contextual=2, attention_mass=0.5, min_dominant=share - 1)
    match = rf"min_dominant \+ contextual must be <= {share} for an image of {len(reductions)} crops"
    with pytest.raises(ValueError, match=match):
        vlmzip.prepare(model, inputs)


def test_an_adaptive_budget_never_exceeds_the_placeholders_when_cls_is_dropped():
    """LLaVA's "default" strategy writes 576 placeholders for the tower's 577 tokens: all of the attention
    keeps at most 576 (with [CLS]'s slot), not 577."""
    processor, model = make_llava_processor("default"), make_llava("default")
    inputs = dict(processor(text=PROMPTS[:2], images=random_images(2, seed=1), return_tensors="pt", padding=True))
    vlmzip.apply(model, contextual=0, attention_mass=1.0)
    prepared = vlmzip.prepare(model, inputs)
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [576, 576]
    vlmzip.remove(model)
    with pytest.raises(ValueError, match=r"min_dominant \+ contextual must be <= 576 \(the placeholders of one image"):
        vlmzip.apply(model, contextual=2, attention_mass=0.5, min_dominant=575)
    assert not vlmzip.is_applied(model)
