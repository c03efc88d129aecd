"""LLaVA-1.5 end to end on a tiny random LlavaForConditionalGeneration (CLIP 336/14 tower, Llama LM)."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import IMAGE_TOKEN_ID, make_llava, make_llava_processor, random_images
from helpers import (
    LanguageModelSpy,
    assert_apply_refused,
    assert_batch_equals_singles,
    assert_remove_restores_bit_identical_logits,
    removed_after,
)

PROMPTS = [
    "USER: <image> what is in the image ? ASSISTANT:",
    "USER: <image> how many are there ? ASSISTANT:",
    "USER: <image> a big red circle left of a small blue square ? what shape is above ? ASSISTANT:",
]


def processor_inputs(processor, images, prompts):
    return processor(images=images, text=prompts, return_tensors="pt", padding=True)


def generate(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, pad_token_id=0, **kwargs)


@pytest.fixture
def patched(fresh_llava):
    vlmzip.apply(fresh_llava, dominant=54, contextual=10)
    yield from removed_after(fresh_llava)


def test_language_model_receives_exactly_the_budget(patched, llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:2], PROMPTS[:2])
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == 2 * 576
    prepared = vlmzip.prepare(patched, inputs)
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [64, 64]
    assert "pixel_values" not in prepared
    with LanguageModelSpy(patched) as spy:
        generate(patched, prepared)
    prompt_length = prepared["input_ids"].shape[1]
    assert spy.shapes[0] == (2, prompt_length, 64)
    assert prompt_length < 64 + 20  # the 576-token sequence never reached the language model
    assert all(shape[1] == 1 for shape in spy.shapes[1:])  # decoding steps, one token each


def test_prepared_features_are_projected_compress_vision(patched, llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:2], PROMPTS[:2])
    prepared = vlmzip.prepare(patched, inputs)
    with torch.no_grad():
        expected = vlmzip.compress_vision(patched.model.vision_tower, inputs["pixel_values"], 54, 10)
        projected = patched.model.multi_modal_projector(expected.features)
    features = prepared["mm_encoder_outputs"]["image"].pooler_output
    assert [f.shape for f in features] == [torch.Size([64, 64])] * 2
    torch.testing.assert_close(torch.stack(features), projected)


@pytest.mark.parametrize(
    "generate_kwargs",
    [{}, {"num_beams": 3}, {"use_cache": False}],
    ids=["greedy", "beam", "no-cache"],
)
def test_batched_generate_equals_per_sample(patched, llava_processor, images, generate_kwargs):
    batch = processor_inputs(llava_processor, images[:3], PROMPTS)
    singles = [processor_inputs(llava_processor, images[i : i + 1], PROMPTS[i : i + 1]) for i in range(3)]
    assert_batch_equals_singles(patched, batch, singles, max_new_tokens=6, **generate_kwargs)


def test_no_cache_equals_cache(patched, llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:2], PROMPTS[:2])
    cached = generate(patched, vlmzip.prepare(patched, inputs))
    uncached = generate(patched, vlmzip.prepare(patched, inputs), use_cache=False)
    assert torch.equal(cached, uncached)


def test_sampling_runs_and_is_seeded(patched, llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:2], PROMPTS[:2])
    torch.manual_seed(0)
    first = generate(patched, vlmzip.prepare(patched, inputs), do_sample=True, top_k=5)
    torch.manual_seed(0)
    second = generate(patched, vlmzip.prepare(patched, inputs), do_sample=True, top_k=5)
    assert torch.equal(first, second)
    prompt_length = vlmzip.prepare(patched, inputs)["input_ids"].shape[1]
    assert prompt_length < first.shape[1] <= prompt_length + 6  # sampling may stop early at EOS


def test_batch_mixing_text_only_prompts(patched, llava_processor, images):
    tokenizer = llava_processor.tokenizer
    text_only = "USER: how many are there ? ASSISTANT:"
    mixed = llava_processor(images=images[:1], text=[PROMPTS[0], text_only], return_tensors="pt", padding=True)
    prepared = vlmzip.prepare(patched, mixed)
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [64, 0]
    batch = generate(patched, prepared)
    alone_image = generate(patched, vlmzip.prepare(patched, processor_inputs(llava_processor, images[:1], PROMPTS[:1])))
    alone_text = generate(patched, tokenizer([text_only], return_tensors="pt"))
    assert torch.equal(batch[0, -6:], alone_image[0, -6:])
    assert torch.equal(batch[1, -6:], alone_text[0, -6:])


def test_two_images_in_one_prompt(patched, llava_processor, images):
    prompt = "USER: <image> <image> what is left of ? ASSISTANT:"
    inputs = llava_processor(images=images[:2], text=[prompt], return_tensors="pt")
    prepared = vlmzip.prepare(patched, inputs)
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum() == 128
    features = prepared["mm_encoder_outputs"]["image"].pooler_output
    assert len(features) == 2
    generate(patched, prepared)


def test_generate_prepares_raw_inputs_itself(patched, llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:2], PROMPTS[:2])
    prepared = vlmzip.prepare(patched, inputs)
    explicit = generate(patched, prepared)
    implicit = generate(patched, inputs)  # the caller's prompt, then the same new tokens
    length = inputs["input_ids"].shape[1]
    assert torch.equal(implicit[:, :length], inputs["input_ids"])
    assert torch.equal(implicit[:, length:], explicit[:, prepared["input_ids"].shape[1] :])


def test_forward_with_labels_shrinks_labels(patched, llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:2], PROMPTS[:2])
    labels = inputs["input_ids"].clone()
    labels[labels == IMAGE_TOKEN_ID] = -100
    labels[inputs["attention_mask"] == 0] = -100
    prepared = vlmzip.prepare(patched, {**inputs, "labels": labels})
    assert prepared["labels"].shape == prepared["input_ids"].shape
    text = prepared["input_ids"] != IMAGE_TOKEN_ID
    real = prepared["attention_mask"].bool()
    assert torch.equal(prepared["labels"][text & real], prepared["input_ids"][text & real])
    with torch.no_grad():
        out = patched(**prepared)
        out_raw = patched(**inputs, labels=labels)  # forward prepares raw inputs too
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out_raw.loss)


def test_right_padding_is_kept(fresh_llava, images):
    processor = make_llava_processor(padding_side="right")
    vlmzip.apply(fresh_llava, dominant=20, contextual=4)
    inputs = processor_inputs(processor, images[:2], [PROMPTS[0], PROMPTS[2]])
    prepared = vlmzip.prepare(fresh_llava, inputs)
    mask = prepared["attention_mask"]
    assert mask[:, 0].all() and not mask[:, -1].all()
    left = vlmzip.prepare(fresh_llava, inputs, padding_side="left")
    assert left["attention_mask"][:, -1].all()


def test_remove_restores_bit_identical_logits(llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:2], PROMPTS[:2])
    assert_remove_restores_bit_identical_logits(make_llava, inputs, dominant=54, contextual=10)


def test_remove_restores_existing_instance_forward(fresh_llava):
    def custom_forward(*args, **kwargs):
        return "custom"

    fresh_llava.forward = custom_forward
    vlmzip.apply(fresh_llava, dominant=54, contextual=10)
    vlmzip.remove(fresh_llava)
    assert fresh_llava.forward is custom_forward


def test_apply_twice_is_an_error(patched):
    with pytest.raises(ValueError, match="already has VisionZip applied"):
        vlmzip.apply(patched, dominant=54, contextual=10)


def test_config_object_and_fields(fresh_llava):
    config = vlmzip.VisionZipConfig.from_tokens(128)
    assert (config.dominant, config.contextual) == (108, 20)
    vlmzip.apply(fresh_llava, config)
    vlmzip.remove(fresh_llava)
    with pytest.raises(TypeError, match="either"):
        vlmzip.apply(fresh_llava, config, dominant=3)
    with pytest.raises(TypeError, match="VisionZipConfig"):
        vlmzip.apply(fresh_llava, {"dominant": 54})


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dominant": 0}, ValueError, "dominant"),
        ({"contextual": -2}, ValueError, "contextual"),
        ({"dominant": "54"}, TypeError, "dominant"),
        ({"dominant": 570, "contextual": 10}, ValueError, r"dominant \+ contextual must be <= 576"),
        ({"dominant": 567, "contextual": 10}, ValueError, r"<= 576 \(.* less the \[CLS\] its feature strategy drops"),
        ({"feature_layer": 9}, ValueError, "feature_layer"),
        ({"merge": "sum"}, ValueError, "merge"),
        ({"method": "nope"}, ValueError, "method"),
    ],
)
def test_bad_config_leaves_model_untouched(fresh_llava, kwargs, error, match):
    assert_apply_refused(fresh_llava, error, match, **kwargs)


def test_unsupported_family():
    with pytest.raises(ValueError, match="model: unsupported model family Linear"):
        vlmzip.apply(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="model"):
        vlmzip.apply("llava")


def test_prepare_rejects_mismatched_inputs(patched, llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:2], PROMPTS[:2])
    fewer_images = {**inputs, "pixel_values": inputs["pixel_values"][:1]}
    with pytest.raises(ValueError, match="placeholder"):
        vlmzip.prepare(patched, fewer_images)
    cut = {**inputs, "input_ids": inputs["input_ids"].clone()}
    cut["input_ids"][0, 5] = 7  # break one run
    with pytest.raises(ValueError, match="placeholder"):
        vlmzip.prepare(patched, cut)
    with pytest.raises(TypeError, match="inputs"):
        vlmzip.prepare(patched, [inputs])
    with pytest.raises(ValueError, match="input_ids"):
        vlmzip.prepare(patched, {"pixel_values": inputs["pixel_values"]})
    with pytest.raises(ValueError, match="pixel_values"):
        vlmzip.prepare(patched, {**inputs, "pixel_values": inputs["pixel_values"][0]})
    with pytest.raises(ValueError, match="padding_side"):
        vlmzip.prepare(patched, inputs, padding_side="middle")


def test_prepare_needs_apply(fresh_llava, llava_processor, images):
    inputs = processor_inputs(llava_processor, images[:1], PROMPTS[:1])
    with pytest.raises(ValueError, match="apply"):
        vlmzip.prepare(fresh_llava, inputs)
    with pytest.raises(ValueError, match="nothing to remove"):
        vlmzip.remove(fresh_llava)


def test_text_only_inputs_pass_through(patched, llava_processor):
    inputs = llava_processor.tokenizer(["USER: how many ? ASSISTANT:"], return_tensors="pt")
    prepared = vlmzip.prepare(patched, inputs)
    assert prepared.keys() == dict(inputs).keys()
    assert all(prepared[k] is inputs[k] for k in prepared)


def test_full_strategy_keeps_budget(images):
    model = make_llava(strategy="full")
    processor = make_llava_processor(strategy="full")
    inputs = processor_inputs(processor, images[:1], PROMPTS[:1])
    assert (inputs["input_ids"] == IMAGE_TOKEN_ID).sum() == 577
    vlmzip.apply(model, dominant=108, contextual=20)
    prepared = vlmzip.prepare(model, inputs)
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum() == 128
    generate(model, prepared)


def test_default_strategy_budget_is_capped_at_its_placeholders(images):
    """The "default" strategy writes 576 placeholders for the tower's 577 tokens: 576 fit, 577 are refused
    at apply(), not later at prepare()."""
    model, processor = make_llava(strategy="default"), make_llava_processor(strategy="default")
    inputs = processor_inputs(processor, images[:1], PROMPTS[:1])
    vlmzip.apply(model, dominant=566, contextual=10)
    prepared = vlmzip.prepare(model, inputs)
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum() == 576
    generate(model, prepared)
    vlmzip.remove(model)
    assert_apply_refused(model, ValueError, r"must be <= 576", dominant=567, contextual=10)


@pytest.mark.parametrize("method", ["pool", "random", "visionzip-dominant"])
def test_other_methods_same_budget(fresh_llava, llava_processor, images, method):
    vlmzip.apply(fresh_llava, dominant=54, contextual=10, method=method)
    prepared = vlmzip.prepare(fresh_llava, processor_inputs(llava_processor, images[:2], PROMPTS[:2]))
    assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [64, 64]
    generate(fresh_llava, prepared)


def test_unused_fixture_guard(llava):
    # The shared session model is never patched by any test.
    assert not vlmzip.is_applied(llava)


_ = random_images  # re-exported helper used by other test modules
