"""Qwen3-VL (+ MoE) and Qwen3.5 end to end on tiny random models of the real transformers classes.

Shared behaviour runs on all three (the `family` fixture); deepstack checks on the two Qwen3-VL classes.
"""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import QWEN_IMAGE_TOKEN_ID, QWEN_VIDEO_TOKEN_ID, QWEN_WORDS, qwen_prompt
from families import (
    QWEN3_PATCH_FEATURES,
    make_qwen3_5,
    make_qwen3_5_moe,
    make_qwen3_processor,
    make_qwen3_vl,
    make_qwen3_vl_moe,
)
from helpers import (
    LanguageModelSpy,
    assert_apply_refused,
    assert_forward_prepares_raw_inputs,
    assert_remove_restores_bit_identical_logits,
    original_rope_positions,
    parametrised_family_fixtures,
)
from vlmzip.adapters.mrope import reduced_slots

FAMILIES = {"qwen3-vl": make_qwen3_vl, "qwen3-vl-moe": make_qwen3_vl_moe, "qwen3.5": make_qwen3_5}
DEEPSTACK_FAMILIES = ["qwen3-vl", "qwen3-vl-moe"]
DOMINANT, CONTEXTUAL = 8, 4
BUDGET = DOMINANT + CONTEXTUAL
LARGE, SMALL = 48, 30  # merged tokens of a 300x400 (12x16 patches) and a 150x200 (10x12) image
VISION_START, VISION_END = QWEN_WORDS.index("<vision_start>"), QWEN_WORDS.index("<vision_end>")


family, patched, processor = parametrised_family_fixtures(
    FAMILIES, make_qwen3_processor, dominant=DOMINANT, contextual=CONTEXTUAL
)


PROMPTS = [
    (qwen_prompt("<image>"), [0]),
    ("USER: how many are there ? ASSISTANT:", []),  # a text-only row
    (qwen_prompt("<image>", question="how many are there ?"), [2]),
    (qwen_prompt("<image>", "<image>", question="what is left of ?"), [3, 1]),
]


def batch_inputs(processor, images, rows=PROMPTS):
    chosen = [images[index] for _, indices in rows for index in indices]
    return processor(images=chosen, text=[text for text, _ in rows], return_tensors="pt", padding=True)


def single_inputs(processor, images, rows=PROMPTS):
    return [
        processor(images=[images[i] for i in indices] or None, text=[text], return_tensors="pt")
        for text, indices in rows
    ]


def test_language_model_receives_exactly_the_budget(family, patched, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    assert (inputs["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [LARGE, 0, SMALL, SMALL + LARGE]
    prepared = vlmzip.prepare(patched, inputs)
    expected = [BUDGET, 0, BUDGET, 2 * BUDGET]
    assert (prepared["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum(dim=1).tolist() == expected
    assert (prepared["mm_token_type_ids"] == 1).sum(dim=1).tolist() == expected
    output = prepared["mm_encoder_outputs"]["image"]
    assert [tuple(f.shape) for f in output.pooler_output] == [(BUDGET, 64)] * 4
    deepstack = getattr(output, "deepstack_features", None)
    if family in DEEPSTACK_FAMILIES:
        assert [[tuple(f.shape) for f in layer] for layer in deepstack] == [[(BUDGET, 64)] * 4] * 2
    else:
        assert not deepstack
    assert prepared["position_ids"].shape == (3, *prepared["input_ids"].shape)
    for key in ("pixel_values", "image_grid_thw"):
        assert key not in prepared
    with LanguageModelSpy(patched) as spy, torch.no_grad():
        patched.generate(**prepared, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert spy.shapes[0] == (4, prepared["input_ids"].shape[1], 64)
    assert all(shape[:2] == (4, 1) for shape in spy.shapes[1:])


def literal_visionzip(features, scores, keys, dominant, contextual):
    """VisionZip without [CLS], written out step by step: top `dominant` units by received attention
    (ascending), then every other unit joins the most similar of `contextual` evenly spaced targets."""
    kept = sorted(torch.topk(scores, dominant).indices.tolist())
    remaining = [i for i in range(scores.numel()) if i not in kept]
    step = max(1, len(remaining) // contextual)
    targets = remaining[::step][:contextual]
    members = {target: [] for target in targets}
    for unit in remaining:
        if unit in targets:
            continue
        similarity = [float(torch.cosine_similarity(keys[unit], keys[t], dim=0)) for t in targets]
        members[targets[similarity.index(max(similarity))]].append(unit)
    tokens = [features[i] for i in kept]
    for target in targets:
        mean = features[members[target]].mean(dim=0) if members[target] else torch.zeros_like(features[0])
        tokens.append(features[target] + mean)
    return torch.stack(tokens)


@torch.no_grad()
def reference_tower(model, pixels, grid):
    """Per image: merged features (with deepstack channels), unit scores and unit keys, computed by hand
    from the last block's input (eager softmax over each image's patches, no [CLS])."""
    tower = model.model.visual
    block = tower.blocks[-1]
    captured = {}
    handles = [
        block.attn.register_forward_pre_hook(
            lambda m, a, k: captured.update(rope=k["position_embeddings"]), with_kwargs=True
        ),
        block.norm1.register_forward_hook(lambda m, a, out: captured.update(normed=out)),
    ]
    with torch.no_grad():
        output = tower(pixels, grid_thw=grid)
    for handle in handles:
        handle.remove()
    heads = block.attn.num_heads
    qkv = block.attn.qkv(captured["normed"]).view(-1, 3, heads, block.attn.head_dim)
    cos, sin = captured["rope"]
    rotate = lambda x: torch.cat([-x[..., x.shape[-1] // 2 :], x[..., : x.shape[-1] // 2]], dim=-1)  # noqa: E731
    query = qkv[:, 0] * cos[:, None] + rotate(qkv[:, 0]) * sin[:, None]
    key = qkv[:, 1] * cos[:, None] + rotate(qkv[:, 1]) * sin[:, None]
    features = torch.cat([output.pooler_output, *(getattr(output, "deepstack_features", None) or [])], dim=-1)
    images, start, unit_start = [], 0, 0
    for t, h, w in grid.tolist():
        n, units = t * h * w, t * h * w // 4
        q, k = query[start : start + n].transpose(0, 1), key[start : start + n].transpose(0, 1)  # (heads, n, d)
        attention = (q @ k.transpose(1, 2) * block.attn.scaling).softmax(dim=-1)  # (heads, queries, keys)
        received = attention.mean(dim=1).sum(dim=0)  # averaged over queries, summed over heads
        unit_keys = qkv[start : start + n, 1].mean(dim=1).view(units, 4, -1).mean(dim=1)
        images.append((features[unit_start : unit_start + units], received.view(units, 4).sum(1), unit_keys))
        start, unit_start = start + n, unit_start + units
    return images


def test_no_cls_selection_and_deepstack_match_a_literal_reference(family, patched, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    prepared = vlmzip.prepare(patched, inputs)
    encoded = vlmzip.api.get_state(patched).adapter.last_encoded
    # Images in placeholder order: rows 0, 2, 3 hold images 0, 2, 3, 1.
    order = [0, 2, 3, 1]
    pixels = patched.model.visual.dtype
    grids = inputs["image_grid_thw"]
    reference = reference_tower(patched, inputs["pixel_values"].to(pixels), grids)
    deepstack = prepared["mm_encoder_outputs"]["image"].get("deepstack_features") or []
    for entry, _image in enumerate(order):
        features, scores, keys = reference[entry]
        expected = literal_visionzip(features, scores, keys, DOMINANT, CONTEXTUAL)
        reduction = encoded.reductions[entry]
        assert sorted(torch.topk(scores, DOMINANT).indices.tolist()) == reduction.kept_indices[0].tolist()
        slot_order = reduced_slots(reduction).argsort()
        main = expected[:, :64][slot_order]
        torch.testing.assert_close(prepared["mm_encoder_outputs"]["image"].pooler_output[entry], main)
        for layer, features_of_layer in enumerate(deepstack):
            # Deepstack: the same kept units and merge groups, applied to that layer's features.
            layer_expected = expected[:, 64 * (layer + 1) : 64 * (layer + 2)][slot_order]
            torch.testing.assert_close(features_of_layer[entry], layer_expected)
    assert bool(deepstack) == (family in DEEPSTACK_FAMILIES)


def test_deepstack_reaches_the_language_model_at_the_kept_positions(patched, processor, qwen_images, family):
    if family not in DEEPSTACK_FAMILIES:
        pytest.skip("Qwen3.5 has no deepstack")
    prepared = vlmzip.prepare(patched, batch_inputs(processor, qwen_images))
    seen = {}
    handle = patched.model.language_model.register_forward_pre_hook(lambda m, a, k: seen.update(k), with_kwargs=True)
    with torch.no_grad():
        patched(**prepared)
    handle.remove()
    ids = prepared["input_ids"]
    assert torch.equal(seen["visual_pos_masks"], ids == QWEN_IMAGE_TOKEN_ID)
    layers = prepared["mm_encoder_outputs"]["image"].deepstack_features
    for given, expected in zip(seen["deepstack_visual_embeds"], layers, strict=True):
        assert torch.equal(given, torch.cat(expected))


def test_rope_positions_of_kept_tokens_are_the_original_ones(patched, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    original = original_rope_positions(patched, inputs)
    prepared = vlmzip.prepare(patched, inputs)
    encoded = vlmzip.api.get_state(patched).adapter.last_encoded
    entry = 0
    for sample in range(4):
        before_mask, after_mask = inputs["attention_mask"][sample].bool(), prepared["attention_mask"][sample].bool()
        ids_before, ids_after = inputs["input_ids"][sample][before_mask], prepared["input_ids"][sample][after_mask]
        before, after = original[:, sample][:, before_mask], prepared["position_ids"][:, sample][:, after_mask]
        text_before, text_after = ids_before != QWEN_IMAGE_TOKEN_ID, ids_after != QWEN_IMAGE_TOKEN_ID
        assert torch.equal(after[:, text_after], before[:, text_before])
        runs_before = (~text_before).nonzero().squeeze(1)
        runs_after = (~text_after).nonzero().squeeze(1)
        offset_before = offset_after = 0
        while offset_after < runs_after.numel():
            slots, full = encoded.slots[entry], encoded.full_counts[entry]
            kept_before = runs_before[offset_before : offset_before + full][slots]
            assert torch.equal(
                after[:, runs_after[offset_after : offset_after + slots.numel()]], before[:, kept_before]
            )
            offset_before, offset_after, entry = offset_before + full, offset_after + slots.numel(), entry + 1
    assert entry == 4


def assert_batch_steps_equal_singles(model, processor, images, **generate_kwargs):
    """Batched generation equals per-sample runs: the tokens, and every step's raw logits within 5e-4.

    Each single run is forced along the batch's tokens for its row (with sampling, the batch's draws),
    so that the logits of every step are compared, not only the greedy choice.
    """
    settings = {"max_new_tokens": 4, "min_new_tokens": 4, "pad_token_id": 0, **generate_kwargs}
    batch = vlmzip.prepare(model, batch_inputs(processor, images))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(**batch, output_logits=True, return_dict_in_generate=True, **settings)
    prompt = batch["input_ids"].shape[1]
    for row, single in enumerate(single_inputs(processor, images)):
        single = vlmzip.prepare(model, single)
        length = single["input_ids"].shape[1]
        forced = out.sequences[row, prompt:].tolist()
        with torch.no_grad():
            alone = model.generate(
                **single,
                output_logits=True,
                return_dict_in_generate=True,
                prefix_allowed_tokens_fn=lambda _, ids, forced=forced, length=length: [forced[ids.shape[-1] - length]],
                **{**settings, "do_sample": False, "num_beams": 1},
            )
        assert alone.sequences[0, length:].tolist() == forced
        if generate_kwargs.get("num_beams", 1) == 1:
            for step, logits in enumerate(alone.logits):
                torch.testing.assert_close(logits[0], out.logits[step][row], atol=5e-4, rtol=0, msg=f"row {row}")
    return out.sequences[:, prompt:]


GENERATION = {
    "greedy": {"do_sample": False},
    "beam": {"do_sample": False, "num_beams": 2},
    "sampling": {"do_sample": True, "top_k": 5},
}
# Every family runs greedy by default; beam search and sampling run on Qwen3-VL by default, on the others with -m slow.
BATCH_CASES = [
    pytest.param(
        name,
        kind,
        id=f"{name}-{kind}",
        marks=[pytest.mark.slow] if kind != "greedy" and name != "qwen3-vl" else [],
    )
    for name in FAMILIES
    for kind in GENERATION
]


@pytest.mark.parametrize(("family_name", "kind"), BATCH_CASES)
def test_batched_generate_equals_per_sample(family_name, kind, processor, qwen_images):
    patched = FAMILIES[family_name]()
    vlmzip.apply(patched, dominant=DOMINANT, contextual=CONTEXTUAL)
    generate_kwargs = GENERATION[kind]
    tokens = assert_batch_steps_equal_singles(patched, processor, qwen_images, **generate_kwargs)
    if generate_kwargs.get("num_beams", 1) > 1:
        # Beam search keeps several hypotheses: the best one of each row must equal the single run's.
        for row, single in enumerate(single_inputs(processor, qwen_images)):
            single = vlmzip.prepare(patched, single)
            with torch.no_grad():
                alone = patched.generate(**single, max_new_tokens=4, min_new_tokens=4, pad_token_id=0, num_beams=2)
            assert alone[0, single["input_ids"].shape[1] :].tolist() == tokens[row].tolist()
    if generate_kwargs.get("do_sample"):
        torch.manual_seed(0)
        again = assert_batch_steps_equal_singles(patched, processor, qwen_images, **generate_kwargs)
        assert torch.equal(again, tokens)  # the seed fixes the draws


def test_qwen3_5_moe_gets_the_budget_and_restores_on_remove(processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    model = make_qwen3_5_moe()
    vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL)
    prepared = vlmzip.prepare(model, inputs)
    assert (prepared["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum(dim=1).tolist() == [BUDGET, 0, BUDGET, 2 * BUDGET]
    with torch.no_grad():
        model.generate(**prepared, max_new_tokens=2, do_sample=False, pad_token_id=0)
    vlmzip.remove(model)
    assert_remove_restores_bit_identical_logits(make_qwen3_5_moe, inputs, dominant=DOMINANT, contextual=CONTEXTUAL)


def test_forward_and_generate_prepare_raw_inputs(patched, processor, qwen_images):
    assert_forward_prepares_raw_inputs(patched, batch_inputs(processor, qwen_images), exact=False)


def test_remove_restores_bit_identical_logits(family, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    assert_remove_restores_bit_identical_logits(FAMILIES[family], inputs, dominant=DOMINANT, contextual=CONTEXTUAL)


# --- video: one placeholder run per temporal slice, after a textual timestamp ------------------------
def video_inputs(processor, grids, image=None, seed=0):
    """Processor-style inputs for one prompt with videos (and optionally an image first), laid out as
    Qwen3-VL's processor does: per temporal slice, a timestamp ("one", "two", ... stand in for
    "<0.5 seconds>"), then the slice's placeholders between vision markers."""
    words = ["USER:"]
    inputs = {}
    if image is not None:
        pixels = processor.image_processor([image], return_tensors="pt")
        inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
        words += ["<vision_start>"] + ["<image>"] * (int(pixels["image_grid_thw"].prod()) // 4) + ["<vision_end>"]
    stamps = ["one", "two", "three", "four", "five"]
    for t, h, w in grids:
        for index in range(t):
            words += [stamps[index], "<vision_start>"] + ["<video>"] * (h * w // 4) + ["<vision_end>"]
    words += "what is in the image ? ASSISTANT:".split()
    generator = torch.Generator().manual_seed(seed)
    patches = sum(t * h * w for t, h, w in grids)
    inputs["pixel_values_videos"] = torch.randn(patches, QWEN3_PATCH_FEATURES, generator=generator)
    inputs["video_grid_thw"] = torch.tensor(grids)
    encoded = processor.tokenizer([" ".join(words)], return_tensors="pt")
    ids = encoded["input_ids"]
    token_types = (ids == QWEN_IMAGE_TOKEN_ID).long() + 2 * (ids == QWEN_VIDEO_TOKEN_ID).long()
    return {"input_ids": ids, "attention_mask": encoded["attention_mask"], "mm_token_type_ids": token_types, **inputs}


def test_video_slices_keep_their_timestamps(patched, processor, qwen_images):
    # An image, then a video of 3 temporal slices of 8x8 patches (16 merged tokens each).
    inputs = video_inputs(processor, [(3, 8, 8)], image=qwen_images[0])
    original = original_rope_positions(patched, inputs)
    prepared = vlmzip.prepare(patched, inputs)
    ids = prepared["input_ids"][0]
    assert int((ids == QWEN_IMAGE_TOKEN_ID).sum()) == BUDGET
    # Every slice keeps exactly the budget, inside its own vision markers, right after its timestamp.
    words = processor.tokenizer.convert_ids_to_tokens(ids.tolist())
    for stamp in ("one", "two", "three"):
        start = words.index(stamp)
        assert words[start + 1] == "<vision_start>" and words[start + 2 + BUDGET] == "<vision_end>"
        assert words[start + 2 : start + 2 + BUDGET] == ["<video>"] * BUDGET
    video = prepared["mm_encoder_outputs"]["video"]
    assert [f.shape[0] for f in video.pooler_output] == [BUDGET] * 3
    encoded = vlmzip.api.get_state(patched).adapter.last_encoded
    assert encoded.modalities == ["image", "video", "video", "video"] and encoded.full_counts == [LARGE, 16, 16, 16]
    # Positions: each kept token keeps its original 3-D position; text (timestamps) too.
    before = (inputs["input_ids"][0] == QWEN_VIDEO_TOKEN_ID).nonzero().squeeze(1)
    after = (ids == QWEN_VIDEO_TOKEN_ID).nonzero().squeeze(1)
    kept = torch.cat([before[16 * index : 16 * (index + 1)][encoded.slots[1 + index]] for index in range(3)])
    assert torch.equal(prepared["position_ids"][:, 0, after], original[:, 0, kept])
    text_before = inputs["mm_token_type_ids"][0] == 0
    text_after = prepared["mm_token_type_ids"][0] == 0
    assert torch.equal(prepared["position_ids"][:, 0, text_after], original[:, 0, text_before])
    with torch.no_grad():
        patched.generate(**prepared, max_new_tokens=2, do_sample=False, pad_token_id=0)


def test_video_budget_scope_and_temporal_step(family, processor):
    inputs = video_inputs(processor, [(2, 8, 8)])
    half = inputs["pixel_values_videos"].shape[0] // 2
    inputs["pixel_values_videos"][half:] = inputs["pixel_values_videos"][:half]  # two identical slices

    def video_tokens(**config):
        model = FAMILIES[family]()
        vlmzip.apply(model, dominant=DOMINANT, contextual=CONTEXTUAL, **config)
        prepared = vlmzip.prepare(model, inputs)
        count = int((prepared["input_ids"] == QWEN_VIDEO_TOKEN_ID).sum())
        assert sum(f.shape[0] for f in prepared["mm_encoder_outputs"]["video"].pooler_output) == count
        return model, prepared, count

    assert video_tokens()[2] == 2 * BUDGET
    assert video_tokens(budget_scope="per_image")[2] == 2 * (DOMINANT // 2 + CONTEXTUAL // 2)
    model, prepared, count = video_tokens(temporal_threshold=0.99)
    assert count == BUDGET + CONTEXTUAL  # the repeated slice's dominant tokens are dropped
    with torch.no_grad():
        model.generate(**prepared, max_new_tokens=2, do_sample=False, pad_token_id=0)


# --- impossible budgets and bad inputs ------------------------------------------------------------
def test_impossible_budgets_are_refused_naming_the_limit(family, processor, qwen_images):
    model = FAMILIES[family]()
    assert_apply_refused(model, ValueError, "feature_layer: Qwen", dominant=8, contextual=4, feature_layer=-2)
    assert_apply_refused(model, ValueError, "dominant", dominant=0, contextual=4)
    vlmzip.apply(model, dominant=25, contextual=10)
    large_only = processor(images=qwen_images[:1], text=[qwen_prompt("<image>")], return_tensors="pt")
    assert (vlmzip.prepare(model, large_only)["input_ids"] == QWEN_IMAGE_TOKEN_ID).sum() == 35
    with pytest.raises(ValueError, match=r"must be <= 30 .*image 1.*5x6.*got 25 \+ 10 = 35"):
        vlmzip.prepare(model, batch_inputs(processor, qwen_images))
    with pytest.raises(ValueError, match=r"must be <= 16 .*video 0 yields per temporal slice"):
        vlmzip.prepare(model, video_inputs(processor, [(2, 8, 8)]))
    vlmzip.remove(model)
    vlmzip.apply(model, dominant=2, contextual=0, budget_scope="per_image")
    with pytest.raises(ValueError, match=r"dominant must be >= the number of crops / frames \(3\)"):
        vlmzip.prepare(model, video_inputs(processor, [(3, 8, 8)]))


def test_bad_inputs(patched, processor, qwen_images):
    inputs = batch_inputs(processor, qwen_images)
    with pytest.raises(ValueError, match=r"inputs\['image_grid_thw'\] is required"):
        vlmzip.prepare(patched, {k: v for k, v in inputs.items() if k != "image_grid_thw"})
    with pytest.raises(ValueError, match=r"inputs\['pixel_values'\] must be the processor's flattened"):
        vlmzip.prepare(patched, {**inputs, "pixel_values": inputs["pixel_values"][:10]})
    video = video_inputs(processor, [(2, 8, 8)])
    merged = video["input_ids"].clone()
    merged[merged == QWEN_VIDEO_TOKEN_ID] = QWEN_IMAGE_TOKEN_ID
    with pytest.raises(ValueError, match="placeholder"):
        vlmzip.prepare(patched, {**video, "input_ids": merged})


# --- `vlmzip show` ---------------------------------------------------------------------------------
def test_show_panels_are_the_merge_units(family, processor, qwen_images, tmp_path, capsys):
    import numpy as np

    from bench.tiny_model import save_family
    from vlmzip.cli import main
    from vlmzip.viz import reduce_image

    model = FAMILIES[family]()
    image = qwen_images[0]
    config = vlmzip.VisionZipConfig(dominant=DOMINANT, contextual=CONTEXTUAL)
    (panel,) = reduce_image(model, processor, image, config)
    # The panel is the 12x16-patch picture the tower saw, cut into 6x8 merge units of 32 px.
    assert panel.grid == (6, 8) and panel.image.size == (256, 192) and panel.num_prefix_tokens == 0
    assert (panel.dominant, panel.contextual, panel.total_tokens) == (DOMINANT, CONTEXTUAL, LARGE)
    resized = np.asarray(image.resize(panel.image.size, resample=3), dtype=int)
    assert np.abs(np.asarray(panel.image, dtype=int) - resized).max() <= 1
    # The kept units are those prepare() keeps for the same image.
    vlmzip.apply(model, config)
    vlmzip.prepare(model, processor(images=[image], text=[qwen_prompt("<image>")], return_tensors="pt"))
    kept = vlmzip.api.get_state(model).adapter.last_encoded.reductions[0].kept_indices
    assert torch.equal(panel.reduction.kept_indices, kept)

    directory = save_family(family, tmp_path / "model")
    image.save(tmp_path / "scene.png")
    argv = ["show", "--image", str(tmp_path / "scene.png"), "--model", str(directory), "--tokens", "12"]
    assert main([*argv, "--heatmap", "-o", str(tmp_path / "show.png")]) == 0
    assert "12 of 48 tokens" in capsys.readouterr().out
    assert main([*argv[:-1], "60", "-o", str(tmp_path / "show.png")]) == 2
    # Refused at apply(): no image under the processor's max_pixels yields more than 49 merged tokens.
    assert "must be <= 49" in capsys.readouterr().err
