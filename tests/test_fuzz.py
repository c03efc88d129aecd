"""Property-based tests: no input gives a silently wrong result, on every supported family.

Hypothesis draws budgets (valid, out of range, wrong types) x image sizes and aspect ratios (extreme
ones included) x pixel dtypes x batch mixes (text-only rows, several images per prompt). Each case
either yields exactly the promised visual token count per sample, with the batch prepared as each
sample alone is, or raises ValueError / TypeError; afterwards the model is unpatched (apply() that
failed leaves no trace) and gives bit-identical logits. Families come from the registry in
tests/families.py, so a family added there is fuzzed too. The default run draws FUZZ_EXAMPLES cases
per family; the slow run (`pytest -m slow`) draws SLOW_FUZZ_EXAMPLES.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

import vlmzip
from families import FAMILIES

# Cases per family; VLMZIP_FUZZ_EXAMPLES overrides the slow run's count.
FUZZ_EXAMPLES = 8
SLOW_FUZZ_EXAMPLES = int(os.environ.get("VLMZIP_FUZZ_EXAMPLES", "120"))
PROMPTS = ("what is in the image ?", "how many are there ?", "a big red circle left of a small blue square ?")

sizes = st.one_of(
    st.tuples(st.integers(14, 420), st.integers(14, 420)),
    st.sampled_from([(1, 1), (2, 2000), (2000, 2), (3, 700), (500, 20), (20, 500), (337, 1), (28, 28)]),
)
budgets = st.one_of(
    st.tuples(st.integers(1, 80), st.integers(0, 40)),  # mostly valid
    st.tuples(st.integers(-2, 700), st.integers(-2, 300)),  # anything, out of range included
    st.tuples(st.sampled_from([1.5, True, "8", None]), st.integers(0, 4)),  # wrong types
)
cases = st.fixed_dictionaries(
    {
        "budget": budgets,
        "scope": st.sampled_from(["per_crop", "per_image"]),
        "rows": st.lists(st.lists(sizes, min_size=0, max_size=2), min_size=1, max_size=3),
        "dtype": st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int64]),
        "seed": st.integers(0, 2**16),
    }
)


def picture(size: tuple[int, int], seed: int) -> Image.Image:
    width, height = size
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def processed(
    family: Any, processor: Any, rows: list[list[tuple[int, int]]], seed: int, first_row: int = 0
) -> dict[str, Any]:
    """Processor inputs for `rows` (image sizes per sample); row r asks question r + first_row."""
    images = [vlmzip.load_image(picture(size, seed + i), processor) for i, size in enumerate(sum(rows, []))]
    texts = [family.prompt(len(row), PROMPTS[(first_row + r) % len(PROMPTS)]) for r, row in enumerate(rows)]
    return dict(processor(images=images or None, text=texts, return_tensors="pt", padding=True))


def promised_tokens(model: Any, rows: list[list[tuple[int, int]]], inputs: dict, config: Any) -> list[int]:
    """Visual tokens each sample must send: (dominant + contextual) per crop, crops counted as transformers does."""
    sizes = inputs.get("image_sizes")
    # OneVision splits an image into crops only when the processor marks it as its sample's only image.
    per_sample = inputs.get("batch_num_images")
    single = [int(n) == 1 for n in per_sample for _ in range(int(n))] if per_sample is not None else None
    per_row, image = [], 0
    for row in rows:
        total = 0
        for _ in row:
            crops = 1
            if sizes is not None and (single is None or single[image]):  # AnyRes: base crop + grid crops
                crops = image_size_to_num_patches(
                    list(sizes[image].tolist()),
                    model.config.image_grid_pinpoints,
                    model.config.vision_config.image_size,
                )
            total += crops * config.per_unit(crops).tokens
            image += 1
        per_row.append(total)
    return per_row


def visual_counts(model: Any, family: Any, prepared: dict) -> list[int]:
    ids = prepared["input_ids"]
    mask = prepared.get("attention_mask", torch.ones_like(ids)).bool()
    return ((ids == family.image_token_id) & mask).sum(dim=1).tolist()


def real_tokens(ids: torch.Tensor, mask: torch.Tensor) -> list[int]:
    return ids[mask.bool()].tolist()


def reference_logits(model: Any, reference: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**reference).logits


def with_dtype(inputs: dict, dtype: torch.dtype) -> dict:
    for key in ("pixel_values", "pixel_values_videos"):
        if isinstance(inputs.get(key), torch.Tensor):
            inputs[key] = inputs[key].to(dtype)
    return inputs


def check_case(family: Any, model: Any, processor: Any, reference: dict, baseline: torch.Tensor, case: dict) -> None:
    dominant, contextual = case["budget"]
    rows, seed = case["rows"], case["seed"]
    attributes = set(model.__dict__)
    try:
        prepared = None
        try:
            inputs = with_dtype(processed(family, processor, rows, seed), case["dtype"])
            try:
                vlmzip.apply(model, dominant=dominant, contextual=contextual, budget_scope=case["scope"])
            except (ValueError, TypeError):
                assert not vlmzip.is_applied(model) and set(model.__dict__) == attributes  # no trace left
                raise
            prepared = vlmzip.prepare(model, inputs)
        except (ValueError, TypeError) as error:
            event(f"refused: {type(error).__name__}")
        if prepared is not None:
            event("prepared")
            check_prepared(family, model, processor, case, inputs, prepared)
    finally:
        if vlmzip.is_applied(model):
            vlmzip.remove(model)
    assert set(model.__dict__) == attributes
    assert torch.equal(reference_logits(model, reference), baseline)


def check_prepared(family: Any, model: Any, processor: Any, case: dict, inputs: dict, prepared: dict) -> None:
    """A case that prepared without error: exact counts, text untouched, batched == each sample alone."""
    rows, seed = case["rows"], case["seed"]
    config = vlmzip.api.get_state(model).config
    assert visual_counts(model, family, prepared) == promised_tokens(model, rows, inputs, config)
    features = _features(prepared)
    assert len(features) == sum(len(row) for row in rows)
    first = 0
    for row, row_sizes in enumerate(rows):
        before = real_tokens(inputs["input_ids"][row], inputs["attention_mask"][row])
        after = real_tokens(prepared["input_ids"][row], prepared["attention_mask"][row])
        assert [t for t in before if t != family.image_token_id] == [t for t in after if t != family.image_token_id]
        # The sample alone (its images drawn from the same seeds) prepares to the same tokens and features.
        alone_inputs = processed(family, processor, [row_sizes], seed + first, first_row=row)
        alone = vlmzip.prepare(model, with_dtype(alone_inputs, case["dtype"]))
        assert real_tokens(alone["input_ids"][0], alone["attention_mask"][0]) == after
        for mine, batched in zip(_features(alone), features[first : first + len(row_sizes)], strict=True):
            assert mine.shape == batched.shape
            torch.testing.assert_close(mine, batched, rtol=1e-3, atol=1e-3)
        first += len(row_sizes)


def _features(prepared: dict) -> list[torch.Tensor]:
    outputs = prepared.get("mm_encoder_outputs") or {}
    image = outputs.get("image")
    return list(image.pooler_output) if image is not None else []


def fuzz(family_name: str, examples: int, derandomize: bool) -> None:
    family = FAMILIES[family_name]
    model, processor = family.make_model(), family.make_processor()
    reference = processed(family, processor, [[(120, 90)]], seed=7)
    baseline = reference_logits(model, reference)

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=derandomize,
        database=None,
        # Each case costs about a second; report a failure as drawn instead of shrinking it for minutes.
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(case=cases)
    def run(case: dict) -> None:
        check_case(family, model, processor, reference, baseline, case)

    run()


@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_fuzz_inputs(family_name):
    fuzz(family_name, FUZZ_EXAMPLES, derandomize=True)


@pytest.mark.slow
@pytest.mark.parametrize("family_name", list(FAMILIES))
def test_fuzz_inputs_slow(family_name):
    fuzz(family_name, SLOW_FUZZ_EXAMPLES, derandomize=False)
