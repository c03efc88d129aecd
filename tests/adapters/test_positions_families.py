"""positions="original" on Gemma 3, InternVL, SmolVLM and Mistral 3 (1-D positions, tiles and row breaks).

Each check reads only what reaches the language model (its `inputs_embeds` and `position_ids`) and
the unreduced model's first call on the same inputs, so it holds whatever the family's layout.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import pytest
import torch

import vlmzip
from conftest import random_images
from families import FAMILIES
from helpers import assert_batch_equals_singles, removed_after
from test_conversation import run_two_image_dialogue
from vlmzip.adapters.base import original_positions
from vlmzip.adapters.smolvlm import SMOLVLM_TOWER
from vlmzip.core import adaptive_dominant
from vlmzip.probe import ProbeOutput, probe_vision_tower

NAMES = ("gemma3", "internvl", "smolvlm", "mistral3")
# Where each family's tower sits, and the text its processor expands into an image's placeholders.
TOWERS = {"gemma3": "vision_tower", "internvl": "vision_tower", "smolvlm": "vision_model", "mistral3": "vision_tower"}
MARKERS = {"gemma3": "<start_of_image>", "internvl": "<IMG_CONTEXT>", "smolvlm": "<image>", "mistral3": "[IMG]"}
SIZES = [(150, 200), (300, 180)]  # SmolVLM splits the second into tiles; InternVL into tiles + thumbnail
QUESTIONS = ["what is in the image ?", "a big red circle left of a small blue square ? what shape ?"]
DOMINANT, CONTEXTUAL = 6, 2


@pytest.fixture(params=NAMES, scope="module")
def name(request):
    return request.param


@pytest.fixture(scope="module")
def processor(name):
    return FAMILIES[name].make_processor()


@pytest.fixture
def model(name):
    yield from removed_after(FAMILIES[name].make_model())


def language_model(model):
    inner = model.model
    return getattr(inner, "language_model", None) or inner.text_model


def inputs_for(name, processor, samples=(0, 1)):
    """A left-padded batch of the given samples: sample i asks QUESTIONS[i] about a seeded image of SIZES[i]."""
    family = FAMILIES[name]
    images = [random_images(1, seed=index, size=SIZES[index]) for index in samples]
    texts = [family.prompt(1, QUESTIONS[index]) for index in samples]
    return dict(processor(images=family.images(images), text=texts, return_tensors="pt", padding=True))


def skewed_scores(model, name) -> AbstractContextManager:
    """Inside: the tower's own probes, with each unit's scores skewed by a draw seeded from its pixels.

    The tiny random towers attend almost uniformly, so every tile would choose the same adaptive count;
    skewed scores (as uneven as a real [CLS] attention, and the same for an image alone or in a batch)
    make them differ. Mistral 3's tower has a probe of its own, and its images differ by size.
    """
    adapter = vlmzip.api.get_state(model).adapter
    if not adapter.serves_probes:
        return nullcontext()
    layout = {"layout": SMOLVLM_TOWER} if name == "smolvlm" else {}

    def source(pixel_values: torch.Tensor) -> ProbeOutput:
        probe = probe_vision_tower(adapter.vision_tower(), pixel_values, adapter.feature_layer, **layout)
        scores = probe.scores.clone()
        for row in range(scores.shape[0]):
            seed = int(pixel_values[row].double().abs().sum() * 100) % 100_003
            noise = torch.randn(scores.shape[1], generator=torch.Generator().manual_seed(seed))
            scores[row] *= torch.exp((1 + seed % 4) * noise).to(scores.dtype)
        return ProbeOutput(probe.features, scores, probe.keys, probe.has_cls, probe.num_prefix_tokens, probe.grid)

    return adapter.probes_from(source)


def lm_calls(model, inputs, **generate_kwargs):
    """(inputs_embeds, position_ids) of every language-model call: one forward, or generate() with the kwargs."""
    calls = []

    def record(module, args, kwargs):
        positions = kwargs.get("position_ids")
        calls.append((kwargs["inputs_embeds"].detach().clone(), None if positions is None else positions.clone()))

    handle = language_model(model).register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            if generate_kwargs:
                model.generate(**inputs, pad_token_id=0, **generate_kwargs)
            else:
                model(**inputs)
    finally:
        handle.remove()
    return calls


def assert_tokens_sit_where_they_sit_unreduced(name, model, inputs):
    """Nothing merged: every token the language model sees (text and image) is the unreduced prompt's token at
    the position it is given, text in increasing order, and the last position is the unreduced prompt's, row
    by row of a padded batch."""
    reference = FAMILIES[name].make_model()
    (full_embeds, _), *_ = lm_calls(reference, inputs)
    vlmzip.apply(model, dominant=DOMINANT, contextual=0, positions="original")
    prepared = vlmzip.prepare(model, inputs)
    (embeds, positions), *_ = lm_calls(model, prepared)
    assert torch.equal(positions, prepared["position_ids"])
    unreduced = original_positions(inputs["attention_mask"])
    image_token = FAMILIES[name].image_token_id
    for row in range(inputs["input_ids"].shape[0]):
        real, full_real = prepared["attention_mask"][row].bool(), inputs["attention_mask"][row].bool()
        assert embeds[row][real].shape[0] < full_embeds[row][full_real].shape[0]  # something was dropped
        row_positions = positions[row][real]
        torch.testing.assert_close(embeds[row][real], full_embeds[row][full_real][row_positions], rtol=0, atol=1e-6)
        text_positions = row_positions[prepared["input_ids"][row][real] != image_token]
        assert bool((text_positions.diff() > 0).all())
        assert int(row_positions.max()) == int(unreduced[row].max())  # decoding goes on where it would unreduced


def test_dominant_tokens_and_text_sit_where_they_sit_unreduced(name, processor, model):
    assert_tokens_sit_where_they_sit_unreduced(name, model, inputs_for(name, processor))


def test_several_images_in_one_sample_keep_the_text_between_them_in_place(name, processor, model):
    family = FAMILIES[name]
    images = [random_images(1, seed=index, size=size)[0] for index, size in enumerate(SIZES)]
    text = f"USER: {MARKERS[name]} left of {MARKERS[name]} ? ASSISTANT:"
    inputs = dict(processor(images=family.images([images]), text=[text], return_tensors="pt"))
    assert_tokens_sit_where_they_sit_unreduced(name, model, inputs)
    prepared = vlmzip.prepare(model, inputs)
    word = processor.tokenizer.convert_tokens_to_ids("left")
    assert word != processor.tokenizer.unk_token_id
    (between,) = (inputs["input_ids"][0] == word).nonzero()[:, 0].tolist()  # the word between the two images
    ids, positions = prepared["input_ids"][0], prepared["position_ids"][0]
    assert positions[ids == word].tolist() == [between]  # at its unreduced position
    assert (ids == FAMILIES[name].image_token_id).nonzero()[-1] > (ids == word).nonzero()[0]  # an image after it


def tile_unit(name, run_ids, offset, per_tile):
    """(tile within the run, token within the tile) of placeholder `offset` of a placeholder run, by the
    family's layout: tiles of `per_tile` tokens (InternVL; one tile per run elsewhere), or Mistral 3's lines
    of `cols` [IMG] tokens each followed by an [IMG_BREAK] (the run's first non-[IMG] token)."""
    if name == "mistral3":
        breaks = (run_ids != FAMILIES[name].image_token_id).nonzero()
        cols = int(breaks[0]) if breaks.numel() else run_ids.numel()
        return 0, offset // (cols + 1) * cols + offset % (cols + 1)
    return offset // per_tile, offset % per_tile


BUDGETS = {  # pool's count must tile the grid; an adaptive budget gives every tile its own count
    "visionzip": {"dominant": DOMINANT, "contextual": CONTEXTUAL},
    "pool": {"dominant": 4, "contextual": CONTEXTUAL, "method": "pool"},
    "adaptive": {"contextual": CONTEXTUAL, "attention_mass": 0.3, "min_dominant": 2},
}


@pytest.mark.parametrize("budget", list(BUDGETS))
def test_every_token_takes_the_placeholder_of_its_anchor(name, processor, model, budget):
    """Dominant tokens: their own placeholder; contextual token j: a placeholder whose token was merged into j
    (VisionZip: its target; pool: its group's first token). Text keeps its unreduced positions."""
    vlmzip.apply(model, positions="original", **BUDGETS[budget])
    inputs = inputs_for(name, processor)
    with skewed_scores(model, name):
        prepared = vlmzip.prepare(model, inputs)
    adapter = vlmzip.api.get_state(model).adapter
    reductions = adapter.last_encoded.reductions
    rows = [(reduction, row) for reduction in reductions for row in range(reduction.groups.shape[0])]
    per_tile = adapter.tokens_per_unit()
    unreduced = original_positions(inputs["attention_mask"])
    image_token = FAMILIES[name].image_token_id
    full_counts = adapter.full_counts(inputs)
    blocks = adapter.placeholder_blocks(inputs, inputs["input_ids"], inputs["attention_mask"], full_counts)
    checked = 0
    for sample in range(len(QUESTIONS)):
        mask = prepared["attention_mask"][sample].bool()
        ids, positions = prepared["input_ids"][sample][mask], prepared["position_ids"][sample][mask]
        full_ids = inputs["input_ids"][sample][inputs["attention_mask"][sample].bool()]
        text = ids != image_token
        assert torch.equal(full_ids[positions[text]], ids[text])  # text at its own unreduced position
        image_positions = positions[~text]
        for block in [b for b in blocks if b[0] == sample]:
            _, start, size = block
            first = int(unreduced[sample, start])
            inside = image_positions[(image_positions >= first) & (image_positions < first + size)]
            run_ids = inputs["input_ids"][sample, start : start + size]
            tiles = size // per_tile if name == "internvl" else 1  # elsewhere every tile is a run of its own
            for tile in range(tiles):  # each tile's reduced tokens: its reduction row's, in order
                reduction, row = rows.pop(0)
                kept, groups = reduction.kept_indices[row], reduction.groups[row]
                tile_tokens, inside = inside[: reduction.features.shape[1]], inside[reduction.features.shape[1] :]
                assert tile_tokens.numel() == reduction.features.shape[1]
                for index, position in enumerate(tile_tokens.tolist()):
                    own_tile, unit = tile_unit(name, run_ids, position - first, per_tile)
                    assert own_tile == tile  # within its own tile
                    if index < kept.numel():
                        assert unit == int(kept[index])
                    else:
                        assert int(groups[unit]) == index - kept.numel()
                    checked += 1
            assert inside.numel() == 0
    assert not rows and checked == sum(r.features.shape[0] * r.features.shape[1] for r in reductions)
    if budget == "adaptive":
        assert len({r.features.shape[1] for r in reductions}) > 1  # the tiles chose different counts


def test_all_tokens_kept_give_bit_identical_logits_and_generation(name, processor, model):
    if name == "mistral3":
        pytest.skip("Mistral 3 drops an image's [IMG_BREAK] tokens, so its reduced prompt is never the unreduced one")
    reference = FAMILIES[name].make_model()
    tokens = vlmzip.adapters.geometry_of(model).tokens_per_unit()
    vlmzip.apply(model, dominant=tokens, contextual=0, positions="original")
    inputs = inputs_for(name, processor)
    single = inputs_for(name, processor, [1])  # model(**batch) numbers padding too; generate() does not
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_logits": True}
    with torch.no_grad():
        assert torch.equal(model(**single).logits, reference(**single).logits)
        expected = reference.generate(**inputs, return_dict_in_generate=True, **kwargs)
        got = model.generate(**inputs, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


@pytest.mark.parametrize("method", ["visionzip", "visionzip-dominant", "divprune", "tome"])  # random: per batch
def test_batch_equals_per_sample(name, processor, model, method):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, method=method, positions="original")
    batch = inputs_for(name, processor)
    singles = [inputs_for(name, processor, [index]) for index in range(2)]
    assert_batch_equals_singles(model, batch, singles)
    assert_batch_equals_singles(model, batch, singles, num_beams=2)


def test_decoding_continues_from_the_unreduced_length_with_beams_and_sampling(name, processor, model):
    inputs = inputs_for(name, processor)
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, positions="original")
    unreduced_next = original_positions(inputs["attention_mask"])[:, -1] + 1
    for kwargs in ({"num_beams": 2}, {"do_sample": True, "top_k": 5}):
        torch.manual_seed(0)
        calls = lm_calls(model, inputs, max_new_tokens=3, **kwargs)
        expected = unreduced_next.repeat_interleave(kwargs.get("num_beams", 1))
        assert len(calls) == 3
        for step, (_, positions) in enumerate(calls[1:]):
            assert torch.equal(positions[:, -1], expected + step)


def test_conversation_turns_equal_fresh_runs(name, processor, model):
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, positions="original")
    images = random_images(2, seed=4, size=(160, 160))
    tower = getattr(model.model, TOWERS[name])
    run_two_image_dialogue(model, FAMILIES[name].make_processor(), images, tower, MARKERS[name])


@pytest.mark.parametrize("positions", ["compact", "original"])
def test_adaptive_budgets_give_every_tile_its_own_count(name, processor, model, positions):
    vlmzip.apply(model, contextual=CONTEXTUAL, attention_mass=0.5, min_dominant=2, positions=positions)
    batch = inputs_for(name, processor)
    singles = [inputs_for(name, processor, [index]) for index in range(2)]
    with skewed_scores(model, name):
        prepared = vlmzip.prepare(model, batch)
        reductions = vlmzip.api.get_state(model).adapter.last_encoded.reductions
        counts = [r.features.shape[1] for r in reductions]
        for reduction in reductions:  # each tile's count: its scores' mass, clamped, then the contextual tokens
            ceiling = reduction.groups.shape[1] - CONTEXTUAL
            expected = adaptive_dominant(reduction.scores, 0.5, has_cls=False, minimum=2, maximum=ceiling)
            assert reduction.features.shape[1] == int(expected[0]) + CONTEXTUAL
        assert len(set(counts)) > 1
        image_tokens = (prepared["input_ids"] == FAMILIES[name].image_token_id).sum(dim=1).tolist()
        assert sum(image_tokens) == sum(counts)
        assert_batch_equals_singles(model, batch, singles)
        assert_batch_equals_singles(model, batch, singles, num_beams=2)


def test_an_adaptive_minimum_above_a_tile_is_refused_by_name(name, model):
    available = vlmzip.adapters.geometry_of(model).tokens_per_unit()
    with pytest.raises(ValueError, match=rf"min_dominant \+ contextual must be <= {available}\b.*got 2 \+ {available}"):
        vlmzip.apply(model, contextual=available, attention_mass=0.5, min_dominant=2)
    assert not vlmzip.is_applied(model)


def test_an_adaptive_budget_ignores_the_unused_dominant_count(name, processor, model):
    """dominant (54 by default) + contextual may exceed a tile; only min_dominant + contextual has to fit."""
    vlmzip.apply(model, contextual=12, attention_mass=0.3)
    assert vlmzip.api.get_state(model).config.tokens > vlmzip.adapters.geometry_of(model).tokens_per_unit()
    prepared = vlmzip.prepare(model, inputs_for(name, processor))
    assert int((prepared["input_ids"] == FAMILIES[name].image_token_id).sum()) > 0
