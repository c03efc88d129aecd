"""The evaluator with an image cache gives exactly what the public API and the plain model give."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import make_llava, make_llava_processor
from eval.tiny_data import write_vqa
from vlmzip.cache import ImageCache
from vlmzip.eval.evaluator import Evaluator
from vlmzip.eval.items import held_out_set, jsonl_set
from vlmzip.variants import FULL, Variant

NEW_TOKENS = 3


def prompt(question: str) -> str:
    return f"USER: <image> {question} ASSISTANT:"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = make_llava()
    model.generation_config.pad_token_id = 0
    processor = make_llava_processor()
    data = jsonl_set(write_vqa(tmp_path_factory.mktemp("vqa")))
    return model, processor, data


def evaluator(setup, cached: bool, batch_size: int = 4) -> Evaluator:
    model, processor, data = setup
    cache = ImageCache(max_bytes=2**24) if cached else None
    return Evaluator(
        model, processor, data, prompt=prompt, batch_size=batch_size, max_new_tokens=NEW_TOKENS, image_cache=cache
    )


def plain_answers(model, processor, data, **apply_fields) -> list[str]:
    """One question at a time through the public API (or the untouched model)."""
    if apply_fields:
        vlmzip.apply(model, **apply_fields)
    try:
        answers = []
        for item in data.items:
            inputs = processor(
                images=[data.load_image(item.image_key)], text=[prompt(item.question)], return_tensors="pt"
            )
            if apply_fields:
                inputs = vlmzip.prepare(model, inputs)
            with torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            answers.append(processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        return [answer.strip() for answer in answers]
    finally:
        if apply_fields:
            vlmzip.remove(model)


@pytest.mark.parametrize(
    "variant", [Variant(FULL), Variant("visionzip", 64), Variant("tome", 32), Variant("fastv", 64)], ids=str
)
def test_cached_equals_uncached(setup, variant):
    cached = evaluator(setup, cached=True).evaluate(variant)
    uncached = evaluator(setup, cached=False, batch_size=3).evaluate(variant)
    assert cached.predictions == uncached.predictions
    assert cached.n == 9 and cached.tokens == (576 if variant.is_full else variant.budget)


def test_each_image_is_encoded_once_per_reduced_variant(setup):
    model, _, data = setup
    run = evaluator(setup, cached=True)
    calls = []
    handle = model.model.vision_tower.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(1), with_kwargs=True
    )
    try:
        run.evaluate(Variant("visionzip", 64))
    finally:
        handle.remove()
    images = len({item.image_key for item in data.items})
    # One lookup per image and batch (repeats within a batch share it); the first one of each image misses.
    lookups = len({(index // 4, item.image_key) for index, item in enumerate(data.items)})
    assert (run.image_cache.misses, run.image_cache.hits) == (images, lookups - images)
    assert len(calls) <= len(range(0, len(data.items), 4))  # at most one tower call per batch, none once all are known


def test_full_and_visionzip_equal_the_public_path(setup):
    model, processor, data = setup
    run = evaluator(setup, cached=True)
    assert run.evaluate(Variant(FULL)).predictions == plain_answers(model, processor, data)
    expected = plain_answers(model, processor, data, dominant=54, contextual=10)
    assert run.evaluate(Variant("visionzip", 64)).predictions == expected


def test_scoring_per_type(setup):
    model, processor, data = setup
    run = evaluator(setup, cached=True)
    predictions = run.evaluate(Variant(FULL)).predictions
    # Make the first two questions' accepted answer the model's own prediction.
    for index in range(2):
        item = data.items[index]
        data.items[index] = type(item)(item.image_key, item.question, (predictions[index],), item.type)
    result = run.evaluate(Variant(FULL))
    row = result.row()
    assert row["correct"] >= 2 and row["n"] == 9
    assert set(row["per_type"]) == {"what", "count"} and row["per_type_n"] == {"what": 6, "count": 3}
    assert row["accuracy"] == pytest.approx(row["correct"] / 9)


def test_held_out_split_items():
    data = held_out_set(7)
    assert len(data.items) == 7
    keys = [item.image_key for item in data.items]
    assert len(set(keys)) < len(keys)  # several questions per scene
    assert data.load_image(keys[0]).size == (336, 336)
    assert {item.type for item in data.items} <= {"count", "position", "size", "shape", "exist"}
    with pytest.raises(ValueError, match="limit"):
        held_out_set(0)


def test_bad_settings(setup):
    model, processor, data = setup
    with pytest.raises(ValueError, match="batch_size"):
        Evaluator(model, processor, data, prompt=prompt, batch_size=0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        Evaluator(model, processor, data, prompt=prompt, max_new_tokens=0)
