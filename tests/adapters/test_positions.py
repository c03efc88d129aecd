"""positions="original": reduced tokens keep the unreduced prompt's position ids, on every 1-D position family."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import (
    IMAGE_TOKEN_ID,
    make_llava,
    make_llava_processor,
    make_qwen2_vl,
    make_qwen_processor,
    qwen_prompt,
    random_images,
)
from families import make_llava_next, make_llava_next_processor, make_onevision, make_onevision_processor, random_video
from helpers import TWO_IMAGE_TURNS, assert_batch_equals_singles
from test_conversation import run_dialogue
from vlmzip.adapters.base import original_positions
from vlmzip.core import GROUP_DOMINANT

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> how many ? ASSISTANT:"]
PRE_LLM_METHODS = ("visionzip", "visionzip-dominant", "pool", "random", "divprune", "tome")


class Recorder:
    """Records inputs_embeds and position_ids of every call into the language model."""

    def __init__(self, model):
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module, args, kwargs):
        positions = kwargs.get("position_ids")
        self.calls.append((kwargs["inputs_embeds"].detach().clone(), None if positions is None else positions.clone()))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.handle.remove()


def llava_inputs(strategy="default", prompts=PROMPTS, images=None):
    processor = make_llava_processor(strategy)
    images = images if images is not None else random_images(len(prompts), seed=5)
    return dict(processor(text=prompts, images=images, return_tensors="pt", padding=True))


def first_call(model, inputs):
    with Recorder(model) as recorder, torch.no_grad():
        model(**inputs)
    return recorder.calls[0]


def unmerged_first_calls(reference, model, inputs, dominant):
    """apply(dominant=`dominant`, nothing merged, original positions) to `model`, then the first language
    model call of the unreduced `reference` on `inputs` and of `model` on the prepared inputs.

    Returns (unreduced embeddings, reduced embeddings, reduced positions, prepared inputs).
    """
    vlmzip.apply(model, dominant=dominant, contextual=0, positions="original")
    full_embeds, _ = first_call(reference, inputs)
    prepared = vlmzip.prepare(model, inputs)
    embeds, positions = first_call(model, prepared)
    return full_embeds, embeds, positions, prepared


def test_all_tokens_kept_give_bit_identical_logits_and_generation():
    inputs = llava_inputs("full")  # 577 placeholders per image: [CLS] + 576 patches
    reference, model = make_llava("full"), make_llava("full")
    vlmzip.apply(model, dominant=577, contextual=0, positions="original")
    single = {key: value[:1] for key, value in inputs.items()}
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0, "output_logits": True}
    with torch.no_grad():
        assert torch.equal(model(**single).logits, reference(**single).logits)
        expected = reference.generate(**inputs, return_dict_in_generate=True, **kwargs)
        got = model.generate(**inputs, return_dict_in_generate=True, **kwargs)
    assert torch.equal(got.sequences, expected.sequences)  # left-padded batch of two
    assert all(torch.equal(a, b) for a, b in zip(got.logits, expected.logits, strict=True))


def test_compact_is_the_default_and_gives_no_position_ids():
    inputs = llava_inputs()
    model = make_llava()
    vlmzip.apply(model, dominant=20, contextual=4)
    assert "position_ids" not in vlmzip.prepare(model, inputs)


@pytest.mark.parametrize("method", PRE_LLM_METHODS)
def test_positions_equal_the_unreduced_prompt_at_the_kept_slots(method):
    """Text keeps its unreduced positions; each image token sits at its anchor's placeholder position."""
    inputs = llava_inputs("default")
    model = make_llava("default")
    vlmzip.apply(model, dominant=20, contextual=5, method=method, positions="original")
    prepared = vlmzip.prepare(model, inputs)
    adapter = vlmzip.api.get_state(model).adapter
    reduction = adapter.last_encoded.reductions[0]
    unreduced = original_positions(inputs["attention_mask"])
    _, positions = first_call(model, prepared)
    assert torch.equal(positions, prepared["position_ids"])
    for row in range(2):
        real = prepared["attention_mask"][row].bool()
        ids, pos = prepared["input_ids"][row][real], positions[row][real]
        full_real = inputs["attention_mask"][row].bool()
        full_ids, full_pos = inputs["input_ids"][row][full_real], unreduced[row][full_real]
        is_image = ids == IMAGE_TOKEN_ID
        # Text: the same tokens, in order, at the positions they have with all tokens.
        assert torch.equal(ids[~is_image], full_ids[full_ids != IMAGE_TOKEN_ID])
        assert torch.equal(pos[~is_image], full_pos[full_ids != IMAGE_TOKEN_ID])
        start = int(full_pos[full_ids == IMAGE_TOKEN_ID][0])  # position of the first placeholder
        image_positions = pos[is_image] - start
        kept = reduction.kept_indices[row]
        # Kept tokens: their own placeholder ([CLS], dropped by "default", takes the first one).
        assert torch.equal(image_positions[: kept.numel()], (kept - 1).clamp(min=0))
        groups = reduction.groups[row]
        for j, anchor in enumerate(image_positions[kept.numel() :].tolist()):
            # A contextual token sits on a token merged into it (placeholder 0 is [CLS]'s too, under "default").
            assert j in {int(groups[anchor + 1]), int(groups[0]) if anchor == 0 else None}
        assert int(pos.max()) == int(full_pos.max())  # decoding continues where it would with all tokens


def test_dominant_tokens_sit_where_their_own_feature_sits_unreduced():
    """An independent check: with nothing merged, every reduced embedding equals the unreduced one at its position."""
    inputs = llava_inputs("full", prompts=PROMPTS[:1])
    reference, model = make_llava("full"), make_llava("full")
    full_embeds, embeds, positions, _ = unmerged_first_calls(reference, model, inputs, 40)
    torch.testing.assert_close(embeds[0], full_embeds[0, positions[0]], rtol=0, atol=1e-6)


def test_decoding_continues_from_the_unreduced_length_with_beams_and_sampling():
    inputs = llava_inputs()
    model = make_llava()
    vlmzip.apply(model, dominant=20, contextual=4, positions="original")
    unreduced_next = original_positions(inputs["attention_mask"])[:, -1] + 1
    for kwargs in ({"num_beams": 2}, {"do_sample": True, "top_k": 5}):
        torch.manual_seed(0)
        with Recorder(model) as recorder, torch.no_grad():
            model.generate(**inputs, max_new_tokens=3, pad_token_id=0, **kwargs)
        beams = kwargs.get("num_beams", 1)
        expected = unreduced_next.repeat_interleave(beams)
        for step, (_, positions) in enumerate(recorder.calls[1:]):
            assert torch.equal(positions[:, -1], expected + step)


@pytest.mark.parametrize("method", [m for m in PRE_LLM_METHODS if m != "random"])  # random draws per batch
def test_llava_batch_equals_per_sample(method):
    inputs = llava_inputs()
    model = make_llava()
    vlmzip.apply(model, dominant=20, contextual=4, method=method, positions="original")
    singles = [llava_inputs(prompts=[p], images=[im]) for p, im in zip(PROMPTS, random_images(2, seed=5), strict=True)]
    assert_batch_equals_singles(model, inputs, singles)
    assert_batch_equals_singles(model, inputs, singles, num_beams=2)


def test_several_images_in_one_sample_keep_the_text_between_them_in_place():
    prompts = ["USER: <image> what is left of <image> ? ASSISTANT:"]
    inputs = llava_inputs(prompts=prompts, images=random_images(2, seed=8))
    model = make_llava()
    vlmzip.apply(model, dominant=10, contextual=2, positions="original")
    prepared = vlmzip.prepare(model, inputs)
    ids, pos = prepared["input_ids"][0], prepared["position_ids"][0]
    full_ids = inputs["input_ids"][0]
    full_pos = torch.arange(full_ids.numel())
    assert torch.equal(pos[ids != IMAGE_TOKEN_ID], full_pos[full_ids != IMAGE_TOKEN_ID])
    second = full_pos[full_ids == IMAGE_TOKEN_ID][576:]  # the second image's placeholders
    second_reduced = pos[ids == IMAGE_TOKEN_ID][12:]
    assert bool(((second_reduced >= second[0]) & (second_reduced <= second[-1])).all())


def test_conversation_turns_equal_fresh_runs_with_original_positions():
    model, processor = make_llava(seed=3), make_llava_processor()
    vlmzip.apply(model, dominant=12, contextual=4, positions="original")
    run_dialogue(model, processor, TWO_IMAGE_TURNS, random_images(2, seed=4), model.model.vision_tower)


# --- LLaVA-NeXT and OneVision -----------------------------------------------------------------------------
NEXT_SIZES = [(150, 300), (200, 700), (336, 672)]  # 1x2 grid (unpadded rows), 1x3 grid, 1x2 grid, no unpadding


def next_inputs(processor, sizes, prompts):
    images = [random_images(1, seed=i, size=size)[0] for i, size in enumerate(sizes)]
    return dict(processor(images=images, text=prompts, return_tensors="pt", padding=True))


@pytest.mark.parametrize("size", NEXT_SIZES)
def test_next_dominant_tokens_sit_where_their_own_feature_sits_unreduced(size):
    inputs = next_inputs(make_llava_next_processor(), [size], PROMPTS[:1])
    reference, model = make_llava_next(), make_llava_next()
    full_embeds, embeds, positions, prepared = unmerged_first_calls(reference, model, inputs, 30)
    crops = vlmzip.api.get_state(model).adapter.last_encoded.reductions[0].features.shape[0]
    is_image = prepared["input_ids"][0] == IMAGE_TOKEN_ID
    image_embeds, image_positions = embeds[0][is_image], positions[0][is_image]
    matches = (image_embeds - full_embeds[0, image_positions]).abs().amax(dim=1) < 1e-5
    # Every token but the crops' [CLS] (absent from the unreduced prompt) and patches that unpadding removed.
    assert int(matches.sum()) >= image_embeds.shape[0] - crops - (0 if size == (336, 672) else 40)
    if size == (336, 672):
        assert int(matches.sum()) == image_embeds.shape[0] - crops
    text = ~is_image
    full_text = inputs["input_ids"][0] != IMAGE_TOKEN_ID
    assert torch.equal(positions[0][text], torch.arange(inputs["input_ids"].shape[1])[full_text])


@pytest.mark.parametrize("size", [(1, 337), (2, 2000)])
def test_next_image_whose_grid_cells_unpadding_removed_takes_its_last_placeholder(size):
    """So narrow an image that unpadding leaves no grid cell: the grid crops' tokens sit at the image's last
    placeholder (no nearest cell exists), the base crop's at their own, and text keeps its positions."""
    inputs = next_inputs(make_llava_next_processor(), [size], PROMPTS[:1])
    model = make_llava_next()
    vlmzip.apply(model, dominant=10, contextual=2, positions="original")
    prepared = vlmzip.prepare(model, inputs)
    full_ids, ids, positions = inputs["input_ids"][0], prepared["input_ids"][0], prepared["position_ids"][0]
    run = (full_ids == IMAGE_TOKEN_ID).nonzero().squeeze(1)
    assert run.numel() == 576  # the base crop's placeholders only
    image_positions = positions[ids == IMAGE_TOKEN_ID]
    crops = vlmzip.api.get_state(model).adapter.last_encoded.reductions[0].features.shape[0]
    assert crops > 1 and image_positions.numel() == crops * 12
    assert bool(((image_positions >= run[0]) & (image_positions <= run[-1])).all())
    assert int((image_positions == run[-1]).sum()) >= (crops - 1) * 10  # every grid crop's dominant tokens
    text = ids != IMAGE_TOKEN_ID
    assert torch.equal(positions[text], torch.arange(full_ids.numel())[full_ids != IMAGE_TOKEN_ID])
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=2, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("method", ("visionzip", "tome"))
def test_next_batch_equals_per_sample(method):
    processor = make_llava_next_processor()
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    inputs = next_inputs(processor, NEXT_SIZES, prompts)
    model = make_llava_next()
    vlmzip.apply(model, dominant=20, contextual=4, method=method, positions="original")
    singles = [
        dict(processor(images=[random_images(1, seed=i, size=s)[0]], text=[p], return_tensors="pt"))
        for i, (s, p) in enumerate(zip(NEXT_SIZES, prompts, strict=True))
    ]
    assert_batch_equals_singles(model, inputs, singles)


def test_onevision_images_and_videos_keep_their_unreduced_features_positions():
    processor = make_onevision_processor()
    images = [random_images(1, seed=1, size=(120, 120))[0]]
    inputs = dict(processor(images=images, text=PROMPTS[:1], return_tensors="pt"))
    reference, model = make_onevision(), make_onevision()
    full_embeds, embeds, positions, prepared = unmerged_first_calls(reference, model, inputs, 20)
    is_image = prepared["input_ids"][0] == IMAGE_TOKEN_ID
    image_embeds, image_positions = embeds[0][is_image], positions[0][is_image]
    # The base crop's tokens exactly; the grid's (which this model downscales, mixing features) inside the grid.
    torch.testing.assert_close(image_embeds[:20], full_embeds[0, image_positions[:20]], rtol=0, atol=1e-5)
    first = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    last = int((inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[-1])
    assert bool(((image_positions[20:] >= first + 49) & (image_positions[20:] < last)).all())

    video_inputs = dict(
        processor(videos=[random_video(4, seed=3)], text=["USER: <video> what ? ASSISTANT:"], return_tensors="pt")
    )
    vlmzip.remove(model)
    full_embeds, embeds, positions, _ = unmerged_first_calls(reference, model, video_inputs, 10)
    torch.testing.assert_close(embeds[0], full_embeds[0, positions[0]], rtol=0, atol=1e-5)


def test_onevision_video_batch_equals_per_sample_with_temporal_threshold():
    processor = make_onevision_processor()
    videos = [random_video(4, seed=10), random_video(4, seed=11)]
    prompts = ["USER: <video> what is in the image ? ASSISTANT:", "USER: <video> how many ? ASSISTANT:"]
    model = make_onevision()
    vlmzip.apply(model, dominant=6, contextual=2, positions="original", temporal_threshold=0.5)
    batch = dict(processor(videos=videos, text=prompts, return_tensors="pt", padding=True))
    singles = [dict(processor(videos=[v], text=[p], return_tensors="pt")) for v, p in zip(videos, prompts, strict=True)]
    assert_batch_equals_singles(model, batch, singles)


# --- M-RoPE and refusals ------------------------------------------------------------------------------------
def test_qwen_keeps_its_rope_positions_whatever_the_scheme():
    processor = make_qwen_processor()
    images = random_images(1, seed=2, size=(112, 112))
    inputs = dict(processor(text=[qwen_prompt("<image>")], images=images, return_tensors="pt"))
    model = make_qwen2_vl()
    prepared = {}
    for scheme in ("compact", "original"):
        vlmzip.apply(model, dominant=6, contextual=2, positions=scheme)
        prepared[scheme] = vlmzip.prepare(model, inputs)
        vlmzip.remove(model)
    assert torch.equal(prepared["compact"]["position_ids"], prepared["original"]["position_ids"])


def test_groups_of_visionzip_contextual_anchors_are_targets():
    from vlmzip.core import anchor_indices, visionzip_reduce

    torch.manual_seed(0)
    features, keys, scores = torch.randn(2, 17, 8), torch.randn(2, 17, 4), torch.rand(2, 16)
    reduction = visionzip_reduce(features, scores, keys, 5, 3)
    anchors = anchor_indices(reduction)
    assert torch.equal(anchors[:, :5], reduction.kept_indices)
    for row in range(2):
        remaining = (reduction.groups[row] != GROUP_DOMINANT).nonzero().squeeze(1)
        assert anchors[row, 5:].tolist() == remaining[torch.arange(0, 12, 4)].tolist()  # evenly spaced targets


def test_bad_position_scheme_is_refused():
    with pytest.raises(ValueError, match=r"positions must be one of \('compact', 'original'\)"):
        vlmzip.VisionZipConfig(positions="renumbered")


def test_a_family_without_the_hooks_refuses_by_name():
    """Every built-in family has the hooks; a family adapter that lacks them refuses both options at apply()."""
    from vlmzip.adapters.llava import LlavaAdapter

    flags = {"supports_original_positions": False, "supports_adaptive": False}
    without_hooks = type("WithoutHooks", (LlavaAdapter,), flags)
    model, name = make_llava(), "LlavaForConditionalGeneration"
    with pytest.raises(ValueError, match=f"positions='original' is not supported for {name}"):
        without_hooks(model, vlmzip.VisionZipConfig(positions="original"))
    with pytest.raises(ValueError, match=rf"attention_mass \(adaptive budget\) is not supported for {name}"):
        without_hooks(model, vlmzip.VisionZipConfig(contextual=2, attention_mass=0.5))


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl", "qwen3.5"])
def test_qwen_takes_an_adaptive_budget(family):
    from families import FAMILIES

    spec = FAMILIES[family]
    processor, model = spec.make_processor(), spec.make_model()
    sizes = [(112, 112), (140, 224)]

    def inputs(samples):
        images = [random_images(1, seed=i, size=sizes[i]) for i in samples]
        texts = [spec.prompt(1) for _ in samples]
        return dict(processor(text=texts, images=spec.images(images), return_tensors="pt", padding=True))

    vlmzip.apply(model, contextual=1, attention_mass=0.4)
    prepared = vlmzip.prepare(model, inputs([0, 1]))
    reductions = vlmzip.api.get_state(model).adapter.last_encoded.reductions
    counts = [r.features.shape[1] for r in reductions]
    assert (prepared["input_ids"] == spec.image_token_id).sum(dim=1).tolist() == counts
    assert_batch_equals_singles(model, inputs([0, 1]), [inputs([0]), inputs([1])])
