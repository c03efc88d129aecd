"""Inputs that used to give silently wrong results, on every supported family.

Non-finite pixels are refused; the budget limit is the tower's token count at the processor's input
size (refused at apply() when it can never fit); `model.generate(**processor_output)` after apply()
returns the caller's own prompt ids followed by the new tokens.
"""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import make_llava, make_llava_processor, make_qwen_processor, random_images
from families import FAMILIES
from helpers import assert_apply_refused, removed_after
from vlmzip import app

DOMINANT, CONTEXTUAL = 6, 2


@pytest.fixture(params=list(FAMILIES), scope="module")
def family(request):
    return FAMILIES[request.param]


@pytest.fixture(scope="module")
def processor(family):
    return family.make_processor()


@pytest.fixture
def model(family):
    yield from removed_after(family.make_model())


def batch(family, processor):
    """Two samples of different lengths (left-padded): one image, and a longer question with one image."""
    images = [random_images(1, seed=1, size=(150, 200)), random_images(1, seed=2, size=(200, 170))]
    texts = [family.prompt(1), family.prompt(1, "a big red circle left of a small blue square ? what shape ?")]
    return processor(images=family.images(images), text=texts, return_tensors="pt", padding=True)


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0, **kwargs)


# --- non-finite pixels ------------------------------------------------------------------------------
def test_non_finite_pixel_values_are_refused_by_prepare(family, processor, model):
    inputs = dict(batch(family, processor))
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    with torch.no_grad():
        expected = model(**inputs).logits
    for value in (float("nan"), float("inf"), float("-inf")):
        pixels = inputs["pixel_values"].clone()
        pixels.view(-1)[pixels.numel() // 2] = value
        with pytest.raises(ValueError, match=r"inputs\['pixel_values'\] holds NaN or infinite"):
            vlmzip.prepare(model, {**inputs, "pixel_values": pixels})
        with pytest.raises(ValueError, match="NaN or infinite"):
            generate(model, {**inputs, "pixel_values": pixels})
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, expected)  # nothing was left half-done


def test_non_finite_pixel_values_are_refused_by_compress_vision(clip_tower):
    pixels = torch.randn(2, 3, 336, 336)
    pixels[1] = float("nan")
    with pytest.raises(ValueError, match="pixel_values holds NaN or infinite"):
        vlmzip.compress_vision(clip_tower, pixels)
    pixels[1] = 0
    pixels[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN or infinite"):
        vlmzip.compress_vision(clip_tower, pixels)


# --- the budget limit comes from the processor's geometry --------------------------------------------
def test_budget_limit_is_the_processors_geometry_on_the_embedded_model(default_model_and_processor):
    model, processor = default_model_and_processor
    assert model.config.vision_config.image_size == 518  # 1370 tokens by the tower config...
    message = r"must be <= 577 .*processor's 336x336 input.*got 600 \+ 0"  # ...577 at the processor's 336 px
    assert_apply_refused(model, ValueError, message, dominant=600, contextual=0)
    with pytest.raises(ValueError, match=message):
        vlmzip.apply(model, dominant=600, contextual=0, processor=processor)
    with pytest.raises(ValueError, match="must be <= 577"):
        app.ask(model, processor, random_images(1)[0], "what shape is it ?", (600, 0))
    vlmzip.apply(model, dominant=577, contextual=0)
    try:
        inputs = processor(images=random_images(1), text=["<image> what shape is it ?"], return_tensors="pt")
        prepared = vlmzip.prepare(model, inputs)
        assert int((prepared["input_ids"] == model.config.image_token_id).sum()) == 577
    finally:
        vlmzip.remove(model)


def test_budget_limit_follows_a_processor_given_to_apply():
    model = make_llava()  # CLIP tower configured for 336 px (577 tokens)
    processor = make_llava_processor()
    processor.image_processor.crop_size = {"height": 224, "width": 224}
    processor.image_processor.size = {"shortest_edge": 224}
    assert_apply_refused(model, ValueError, r"<= 256 .*224x224", dominant=300, contextual=0, processor=processor)
    vlmzip.apply(model, dominant=256, contextual=0, processor=processor)
    vlmzip.remove(model)


def test_qwen_budget_above_max_pixels_is_refused_at_apply():
    model = FAMILIES["qwen2-vl"].make_model()
    processor = make_qwen_processor(max_pixels=224 * 224)  # at most 224 * 224 / 28^2 = 64 merged tokens
    assert_apply_refused(model, ValueError, r"<= 64 .*max_pixels", dominant=60, contextual=5, processor=processor)
    vlmzip.apply(model, dominant=60, contextual=4, processor=processor)
    vlmzip.remove(model)


# --- generate() returns the caller's prompt ----------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [{}, {"num_beams": 2, "num_return_sequences": 2, "return_dict_in_generate": True, "output_scores": True}],
    ids=["greedy", "beams-dict"],
)
def test_generate_returns_the_callers_prompt_then_the_new_tokens(family, processor, model, kwargs):
    inputs = batch(family, processor)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    output = generate(model, inputs, **kwargs)
    sequences = output.sequences if kwargs else output
    ids = inputs["input_ids"]
    repeat = kwargs.get("num_return_sequences", 1)
    assert sequences.shape[0] == ids.shape[0] * repeat
    assert torch.equal(sequences[:, : ids.shape[1]], ids.repeat_interleave(repeat, dim=0))  # padding as given
    if kwargs:
        assert sequences.shape[1] - ids.shape[1] == len(output.scores)
    prepared = vlmzip.prepare(model, inputs)
    explicit = generate(model, prepared, **kwargs)  # the explicit path returns the reduced prompt
    explicit = explicit.sequences if kwargs else explicit
    reduced = prepared["input_ids"]
    assert reduced.shape[1] < ids.shape[1]
    assert torch.equal(explicit[:, : reduced.shape[1]], reduced.repeat_interleave(repeat, dim=0))
    assert torch.equal(sequences[:, ids.shape[1] :], explicit[:, reduced.shape[1] :])
    assert sequences.shape[1] > ids.shape[1]
