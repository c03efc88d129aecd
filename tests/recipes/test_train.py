"""The default model's training recipe: its targets, token subsets and packing (no tower, no weights)."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from recipes.default_model import evaluation, features, modeling, subsets, train
from vlmzip.default_model import build, data

TINY_TEXT = build.TextModelSize(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=1024
)


def _obj(shape, size, x, y):
    return data.SceneObject(shape, size, float(sum(data.SIZE_RANGES[size]) / 2), x, y, (200, 10, 10), 0.0)


SCENE = (
    _obj("star", "small", 40.0, 300.0),
    _obj("star", "large", 200.0, 60.0),
    _obj("circle", "medium", 300.0, 180.0),
    _obj("cross", "small", 120.0, 150.0),
)


def test_referents_name_the_objects_of_each_noun():
    star_small, star_large, circle, cross = SCENE
    cases = {
        "how many objects are there?": [(2, list(SCENE))],
        "how many stars are there?": [(2, [star_small, star_large])],
        "how many small objects are there?": [(3, [star_small, cross])],
        "how many squares are there?": [(2, [])],
        "is there a large star?": [(4, [star_large])],
        "what shape is the leftmost object?": [(5, [star_small])],
        "what shape is the bottommost object?": [(5, [star_small])],
        "what shape is the medium object?": [(5, [circle])],
        "what size is the cross?": [(4, [cross])],
        "is the small star left or right of the circle?": [(3, [star_small]), (9, [circle])],
    }
    for question, expected in cases.items():
        assert data.referents(question, SCENE) == expected, question
        nouns = {"object", "objects", "stars", "squares", *data.SHAPES}
        assert all(data.question_words(question)[word] in nouns for word, _ in expected)


def test_centre_patches_hold_the_object_centres():
    patches = data.centre_patches(SCENE)
    assert patches.tolist() == [21 * 24 + 2, 4 * 24 + 14, 12 * 24 + 21, 10 * 24 + 8]
    labels = data.patch_labels(SCENE)
    assert all(labels[p] > 0 for p in patches)


def test_patch_objects_assign_each_labelled_patch_to_one_object():
    owner = data.patch_objects(SCENE)
    labels = data.patch_labels(SCENE)
    assert owner.shape == labels.shape == (data.GRID * data.GRID,)
    assert ((owner >= 0) == (labels > 0)).all()
    for k, obj in enumerate(SCENE):
        row, col = data.centre_cell(obj)
        assert owner[row * data.GRID + col] == k
        assert set(labels[owner == k].tolist()) == {1 + 3 * data.SHAPES.index(obj.shape) + data.SIZES.index(obj.size)}
    # Large objects cover many patches, small ones at least the one holding their centre.
    assert (owner == 1).sum() > (owner == 0).sum() >= 1


def test_image_token_targets_mark_the_first_kept_token_of_each_object():
    owner = data.patch_objects(SCENE)
    labels = data.patch_labels(SCENE)
    rng = np.random.default_rng(0)
    subset = subsets.token_subset(SCENE, rng, subsets.SubsetMode("objects", 0.5, 0.1))
    first, classes = subsets.image_token_targets([SCENE, SCENE], [None, subset], length=600)
    assert first.shape == classes.shape == (2, 600)
    # [CLS] and the padding after the image tokens have no target.
    assert first[:, 0].tolist() == [-100, -100] and (first[0, 577:] == -100).all()
    assert (first[1, len(subset) :] == -100).all() and (first[1, 1 : len(subset)] != -100).all()
    # All tokens: the first patch of each object in raster order, one per object.
    expected = sorted(int(np.flatnonzero(owner == k)[0]) + 1 for k in range(len(SCENE)))
    assert torch.nonzero(first[0] == 1).flatten().tolist() == expected
    assert classes[0, 1:577].tolist() == labels.tolist()
    # A subset: one first token per object still (the centres are kept), the earliest kept one.
    kept_owner = owner[subset[1:] - 1]
    marked = torch.nonzero(first[1] == 1).flatten().numpy() - 1
    assert sorted(kept_owner[marked].tolist()) == list(range(len(SCENE)))
    for slot in marked:
        assert kept_owner[slot] not in kept_owner[:slot]
    assert classes[1, 1 : len(subset)].tolist() == labels[subset[1:] - 1].tolist()


def test_sample_questions_take_a_number_per_type():
    objects = data.scene_objects(0, "train", 5)
    rng = np.random.default_rng(0)
    per_type = data.sample_questions(objects, rng, per_type={"count": 3, "size": 1})
    assert [q.type for q in per_type] == ["count"] * 3 + ["size"]
    with pytest.raises(ValueError, match="per_type names unknown question types"):
        data.sample_questions(objects, rng, per_type={"colour": 1})
    with pytest.raises(ValueError, match=r"per_type\['count'\] must be an integer >= 0, got -1"):
        data.sample_questions(objects, rng, per_type={"count": -1})
    with pytest.raises(TypeError, match=r"per_type\['size'\] must be an integer >= 0"):
        data.sample_questions(objects, rng, per_type={"size": 1.5})
    without_count = dict.fromkeys(data.QUESTION_TYPES[1:], 2)
    rejected = data.sample_questions(objects, rng, per_type=without_count)
    assert rejected and all(q.type != "count" for q in rejected)


def test_token_subsets_keep_cls_every_object_centre_and_raster_order():
    rng = np.random.default_rng(1)
    centres = set((data.centre_patches(SCENE) + 1).tolist())
    assert subsets.token_subset(SCENE, rng, subsets.SubsetMode("all")) is None
    for share in (0.0, 0.5):
        mode = subsets.SubsetMode("objects", object_share=share, background_share=share)
        kept = subsets.token_subset(SCENE, rng, mode)
        assert kept[0] == 0 and np.all(np.diff(kept) > 0) and centres <= set(kept.tolist())
    kept = subsets.token_subset(data.scene_objects(0, "train", 2), rng, subsets.SubsetMode("objects", 0.0, 0.0))
    assert len(kept) == 1 + len(data.scene_objects(0, "train", 2))
    kept = subsets.token_subset(SCENE, rng, subsets.SubsetMode("random", size=40))
    assert len(kept) == 41 and kept[0] == 0 and np.all(np.diff(kept) > 0) and kept[-1] <= 576
    settings = train.TrainSettings()
    kinds = {subsets.subset_mode(rng, settings).kind for _ in range(200)}
    assert kinds == {"all", "objects", "random"}


@pytest.mark.parametrize("share_min", [0.3, 0.0, 0.9])
def test_object_subsets_draw_their_object_share_from_the_minimum_up(share_min):
    rng = np.random.default_rng(0)
    settings = train.TrainSettings(full_share=0.0, object_subset_share=1.0, object_share_min=share_min)
    shares = np.array([subsets.subset_mode(rng, settings).object_share for _ in range(400)])
    assert shares.min() >= share_min and shares.max() < 1.0
    # the whole range is drawn from, not one end of it
    assert shares.min() < share_min + 0.05 and shares.max() > 0.95


def test_sparse_object_subsets_keep_almost_no_background_and_share_zero_keeps_the_random_stream():
    objects_only = dict(full_share=0.0, object_subset_share=1.0)
    rng = np.random.default_rng(0)
    sparse = [subsets.subset_mode(rng, train.TrainSettings(**objects_only, sparse_share=1.0)) for _ in range(300)]
    backgrounds = np.array([m.background_share for m in sparse])
    assert backgrounds.max() < subsets.SPARSE_BACKGROUND_MAX and backgrounds.min() >= 0.0
    kept = [len(subsets.token_subset(SCENE, rng, m)) for m in sparse]
    n_object = int((data.patch_labels(SCENE) > 0).sum())
    # background shares below 0.05 (0.025 on average): on average fewer tokens than objects + 5 % background
    assert np.mean(kept) < 1 + n_object + 0.05 * (data.GRID * data.GRID - n_object)
    # a share of one half makes about half of the object subsets sparse
    rng = np.random.default_rng(1)
    half = [subsets.subset_mode(rng, train.TrainSettings(**objects_only, sparse_share=0.5)) for _ in range(400)]
    assert 0.35 < np.mean([m.background_share < subsets.SPARSE_BACKGROUND_MAX for m in half]) < 0.65
    # share 0 draws nothing extra: the modes are those drawn as the recorded recipes drew them
    settings = train.TrainSettings()
    rng, reference = np.random.default_rng(2), np.random.default_rng(2)
    for _ in range(200):
        mode = subsets.subset_mode(rng, settings)
        u = reference.uniform()
        if u < settings.full_share:
            assert mode.kind == "all"
        elif u < settings.full_share + settings.object_subset_share:
            expected = (reference.uniform(settings.object_share_min, 1.0), reference.uniform(0.0, 1.0))
            assert (mode.kind, mode.object_share, mode.background_share) == ("objects", *expected)
        else:
            assert mode.kind == "random" and mode.size == int(reference.integers(32, data.GRID * data.GRID))


def test_contextual_tokens_merge_what_a_subset_drops_as_visionzip_does():
    from vlmzip.core import visionzip_reduce

    torch.manual_seed(0)
    feats = torch.randn(build.NUM_IMAGE_TOKENS, features.FEATURE_DIM)
    kept = np.array([0, 3, 40, 41, 300, 576])
    merged, anchors = subsets.contextual_tokens(feats, kept, 7)
    assert merged.shape == (7, features.FEATURE_DIM) and anchors.shape == (7,)
    # With the same tokens kept (scores that rank exactly them first) and the features as keys, the
    # library's VisionZip gives the same contextual tokens.
    scores = torch.zeros(1, build.NUM_IMAGE_TOKENS - 1)  # over the patches; [CLS] is always kept
    scores[0, kept[1:] - 1] = 1.0
    reduced = visionzip_reduce(feats[None], scores, feats[None], dominant=len(kept), contextual=7)
    assert reduced.kept_indices[0].tolist() == kept.tolist()
    torch.testing.assert_close(merged, reduced.features[0, len(kept) :])
    # Each anchor is a dropped token that its own group was merged onto, evenly spaced over the dropped ones.
    dropped = np.setdiff1d(np.arange(build.NUM_IMAGE_TOKENS), kept)
    assert set(anchors.tolist()) <= set(dropped.tolist()) and (np.diff(anchors) > 0).all()
    assert reduced.groups[0, torch.from_numpy(anchors)].tolist() == list(range(7))
    # The count is capped at the tokens dropped; nothing dropped gives no contextual token.
    few = np.setdiff1d(np.arange(build.NUM_IMAGE_TOKENS), [5, 9])
    assert subsets.contextual_tokens(feats, few, 30)[0].shape == (2, features.FEATURE_DIM)
    none, no_anchor = subsets.contextual_tokens(feats, np.arange(build.NUM_IMAGE_TOKENS), 5)
    assert none.shape == (0, features.FEATURE_DIM) and no_anchor.size == 0


@pytest.fixture(scope="module")
def tiny_vlm():
    torch.manual_seed(0)
    config = build.build_config(TINY_TEXT)
    model = modeling.TrainableVLM(config, torch.zeros(features.FEATURE_DIM), torch.ones(features.FEATURE_DIM)).eval()
    return model, modeling.Packer(build.build_tokenizer())


PACKED_BATCH = [
    [data.Question("how many stars are there?", "2", "count"), data.Question("is there a star?", "yes", "exist")],
    [data.Question("what size is the cross?", "small", "size")],
]


@pytest.mark.parametrize(
    "kept",
    [[None, None], [np.array([0, 3, 40, 41, 300, 576]), None]],
    ids=["renumbered", "row 0 at original positions"],
)
def test_packed_questions_compute_exactly_like_stand_alone_prompts(tiny_vlm, kept):
    model, packer = tiny_vlm
    batch = PACKED_BATCH
    lengths = [9 if kept[0] is None else len(kept[0]), 5]
    images = [torch.randn(n, TINY_TEXT.hidden_size) for n in lengths]
    packed = packer.pack(batch, lengths, image_positions=kept)
    with torch.inference_mode():
        (hidden,) = model(modeling.pad_images(images), packed.input_ids, packed.mask, packed.position_ids)
        flat = [(b, q) for b, qs in enumerate(batch) for q in qs]
        for (b, q), (row, col) in zip(flat, packed.answer_pos, strict=True):
            ids = torch.tensor([packer.prompt_ids(q.question)])
            embeds = torch.cat([images[b][None], model.lm.get_input_embeddings()(ids)], dim=1)
            # At original positions the image keeps its tokens' indices among the 577 and the text continues
            # from 577, as in the unreduced prompt; renumbered, the text continues from the image's length.
            if kept[b] is None:
                positions = torch.arange(lengths[b] + ids.shape[1])
            else:
                positions = torch.cat([torch.as_tensor(kept[b]), build.NUM_IMAGE_TOKENS + torch.arange(ids.shape[1])])
            alone = model.lm.model(inputs_embeds=embeds, position_ids=positions[None]).last_hidden_state[0, -1]
            assert row == b
            torch.testing.assert_close(hidden[row, col], alone, atol=1e-5, rtol=1e-4)
    # The answer and <eos> carry the labels; everything else is ignored.
    answers = [packer.answer_id(q.answer) for _, q in flat]
    assert sorted(packed.labels[packed.labels != -100].tolist()) == sorted(answers + [packer.eos] * len(flat))


def test_packed_image_positions_must_match_the_image_tokens(tiny_vlm):
    _, packer = tiny_vlm
    with pytest.raises(ValueError, match=r"image_positions\[0\] holds 5 positions for 6 image tokens"):
        packer.pack(PACKED_BATCH, [6, 4], image_positions=[np.arange(5), None])


def test_noun_targets_sit_on_the_nouns_and_compare_the_two_objects(tiny_vlm):
    _, packer = tiny_vlm
    batch = [[data.Question("is the small star left or right of the circle?", "left", "position")]]
    packed = packer.pack(batch, [577])
    ref_pos, ref_t, rel_pos, rel_t = train._noun_targets(packed, batch, [SCENE])
    tokens = packer.tokenizer.convert_ids_to_tokens(packed.input_ids[0].tolist())
    assert [tokens[c] for _, c in ref_pos] == ["star", "circle"]
    star, circle = SCENE[0], SCENE[2]
    assert ref_t.tolist() == [
        [1, data.SHAPES.index("star"), data.SIZES.index("small"), int(star.y // 14), int(star.x // 14)],
        [1, data.SHAPES.index("circle"), data.SIZES.index("medium"), int(circle.y // 14), int(circle.x // 14)],
    ]
    assert [tokens[c] for _, c in rel_pos] == ["circle"]
    # star (40, 300) vs circle (300, 180): the star is left of and below the circle.
    assert rel_t.tolist() == [[1.0, 0.0, 0.0, 1.0] + [1.0] * 4]
    batch = [[data.Question("is the circle above or below the small star?", "above", "position")]]
    _, _, _, rel_t = train._noun_targets(packer.pack(batch, [9]), batch, [SCENE])
    assert rel_t.tolist() == [[0.0, 1.0, 1.0, 0.0] + [1.0] * 4]


def test_phases_end_with_real_scenes_only_and_bad_schedules_are_named():
    settings = replace(train.TrainSettings(), steps=100)
    shares = [train.code_share_at(settings, step) for step in range(settings.steps)]
    assert shares[0] == 1.0 and shares[14] == 1.0 and shares[15] == 0.5  # codes only for the first 15 %
    assert shares[70] == 0.25 and shares[87] == 0.25
    assert set(shares[88:]) == {0.0}  # the last 12 % read real scenes only
    train.check_phases(settings)
    for bad, match in [
        (dict(code_share=(1.0, 0.5)), "code_share needs one share per phase"),
        (dict(code_share=(1.0, 0.5, 1.5, 0.0)), "code_share values must be in 0..1"),
        (dict(phase_ends=(0.15, 0.9, 0.88)), "phase_ends must increase strictly"),
        (dict(phase_ends=(0.0, 0.7, 0.88)), "phase_ends must increase strictly"),
    ]:
        with pytest.raises(ValueError, match=match):
            train.check_phases(replace(settings, **bad))
        with pytest.raises(ValueError, match=match):  # before any training step
            train.train_model(replace(settings, **bad), np.zeros((8, 1, 1), np.float16), None)


def test_train_default_rejects_bad_settings_before_any_tower_pass(monkeypatch, tmp_path):
    def no_tower(*args, **kwargs):
        raise AssertionError("features extracted before the settings were checked")

    monkeypatch.setattr(train, "extract_features", no_tower)
    for bad, match in [
        (dict(phase_ends=(0.15, 0.9, 0.88)), "phase_ends must increase strictly"),
        (dict(relation_layer=9), "relation_layer must be in 1..4"),
        (dict(image_head_layer=0), "image_head_layer must be in 1..4"),
        (dict(image_head_weight=-0.5), r"image_head_weight must be >= 0 \(0 turns that loss off\), got -0.5"),
        (dict(projector_mse_weight=float("nan")), "projector_mse_weight must be >= 0"),
        (dict(precision="fp16"), "precision must be one of"),
        (dict(original_position_share=1.5), "original_position_share must be in 0..1, got 1.5"),
        (dict(object_share_min=float("nan")), "object_share_min must be in 0..1, got nan"),
        (dict(merge_share=-0.1), "merge_share must be in 0..1, got -0.1"),
        (dict(sparse_share=float("inf")), "sparse_share must be in 0..1, got inf"),
        (dict(contextual_max=0), "contextual_max must be in 1..576, got 0"),
        (dict(vision_feature_layer=0), r"vision_feature_layer must be in -12..-1, got 0"),
        (dict(vision_feature_layer=-13), r"vision_feature_layer must be in -12..-1, got -13"),
    ]:
        with pytest.raises(ValueError, match=match):
            train.train_default(tmp_path / "out", settings=replace(train.TrainSettings(), **bad))


@pytest.mark.parametrize("native_bf16", [True, False])
def test_precision_float32_everywhere_bfloat16_only_where_native(monkeypatch, native_bf16):
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native_bf16)
    # The recorded recipe is float32, so a rebuild on any CPU repeats the shipped run's arithmetic.
    assert train.TrainSettings().precision == "float32"
    assert train.autocast_dtype("float32") == torch.float32
    assert train.autocast_dtype("auto") == (torch.bfloat16 if native_bf16 else torch.float32)
    if native_bf16:
        assert train.autocast_dtype("bfloat16") == torch.bfloat16
    else:  # emulated bfloat16 is ~17x slower than float32: refused with the way out
        with pytest.raises(ValueError, match="precision='bfloat16' needs a CPU .* use 'float32' or 'auto'"):
            train.autocast_dtype("bfloat16")
        with pytest.raises(ValueError, match="precision='bfloat16'"):
            train.check_settings(replace(train.TrainSettings(), precision="bfloat16"))
    with pytest.raises(ValueError, match=r"precision must be one of \('float32', 'bfloat16', 'auto'\), got 'half'"):
        train.autocast_dtype("half")


def _tiny_run(**overrides) -> tuple[np.ndarray, train.TrainSettings]:
    """Random tower features of 6 scenes and settings for a few steps of a tiny language model."""
    feats = np.random.default_rng(0).normal(size=(6, build.NUM_IMAGE_TOKENS, features.FEATURE_DIM)).astype(np.float16)
    settings = replace(
        train.TrainSettings(),
        steps=4,
        images_per_step=4,
        questions_per_type=1,
        count_questions=1,
        projector_batch=2,
        text_model=TINY_TEXT,
    )
    return feats, replace(settings, **overrides)


@pytest.mark.parametrize("native_bf16", [True, False])
def test_a_few_training_steps_export_llava_weights(monkeypatch, capsys, native_bf16):
    from transformers import LlavaForConditionalGeneration

    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: native_bf16)
    feats, settings = _tiny_run(precision="auto")
    with pytest.raises(ValueError, match="relation_layer"):
        train.train_model(settings, feats, None)
    settings = replace(settings, referent_layer=1, relation_layer=2)
    model = train.train_model(settings, feats, None)
    assert f"matrix products in {'bfloat16' if native_bf16 else 'float32'}" in capsys.readouterr().out
    assert model.training_precision == ("bfloat16" if native_bf16 else "float32")  # recorded in the metadata
    state = model.export_state_dict()
    expected = LlavaForConditionalGeneration(build.build_config(TINY_TEXT)).state_dict()
    expected = {k for k in expected if "vision_tower" not in k and not k.endswith("inv_freq")}
    assert set(state) == expected
    assert all(torch.isfinite(v).all() for v in state.values())
    packer = modeling.Packer(build.build_tokenizer())
    for keep_tokens in (None, 64):
        acc = evaluation.evaluate_cached(model, packer, feats[:2], "val", 0, keep_tokens=keep_tokens)
        pools = [data.question_pool(data.scene_objects(0, "val", i)) for i in range(2)]
        assert acc["questions"] == sum(bool(qs) for pool in pools for qs in pool.values())


def test_image_token_head_trains_only_when_weighted_and_is_never_exported(capsys):
    feats, settings = _tiny_run(steps=3, referent_layer=1, relation_layer=2)
    plain = train.train_model(settings, feats, None)
    assert not hasattr(plain, "image_head")  # off by default: earlier recipes keep their initialisation
    assert " image " not in capsys.readouterr().out
    headed = train.train_model(replace(settings, image_head_weight=0.5, image_head_layer=2), feats, None)
    assert headed.image_head.weight.grad is not None and headed.image_head.weight.grad.abs().sum() > 0
    assert " image " in capsys.readouterr().out
    assert set(headed.export_state_dict()) == set(plain.export_state_dict())


@pytest.mark.parametrize("share", [0.0, 1.0])
def test_reduced_steps_keep_original_positions_by_their_share(monkeypatch, capsys, share):
    seen = []
    pack = modeling.Packer.pack

    def recording_pack(self, batch, image_lengths, with_answers=True, image_positions=None):
        if with_answers:  # a training step, not the validation
            seen.append(image_positions)
        return pack(self, batch, image_lengths, with_answers, image_positions)

    monkeypatch.setattr(modeling.Packer, "pack", recording_pack)
    feats, settings = _tiny_run(
        steps=3, referent_layer=1, relation_layer=2, full_share=0.0, original_position_share=share, eval_every=3
    )
    train.train_model(settings, feats, feats[:2])
    assert len(seen) == 3
    if share == 0.0:
        assert seen == [None] * 3
    else:  # every step is reduced here, so each passes the kept tokens' indices among the 577
        for positions in seen:
            assert all(p[0] == 0 and (np.diff(p) > 0).all() and p[-1] < build.NUM_IMAGE_TOKENS for p in positions)
    out = capsys.readouterr().out
    assert ("[val, random 64, original positions] step 3" in out) == (share > 0)


@pytest.mark.parametrize("merge_share", [0.0, 1.0])
def test_reduced_steps_add_contextual_tokens_by_their_share(monkeypatch, merge_share):
    seen = []
    pack = modeling.Packer.pack

    def recording_pack(self, batch, image_lengths, with_answers=True, image_positions=None):
        seen.append((list(image_lengths), image_positions))
        return pack(self, batch, image_lengths, with_answers, image_positions)

    monkeypatch.setattr(modeling.Packer, "pack", recording_pack)
    kept_sizes = []
    token_subset = train.token_subset

    def recording_subset(objects, rng, mode):
        kept = token_subset(objects, rng, mode)
        kept_sizes.append(len(kept))
        return kept

    monkeypatch.setattr(train, "token_subset", recording_subset)
    feats, settings = _tiny_run(
        steps=3,
        referent_layer=1,
        relation_layer=2,
        full_share=0.0,
        object_subset_share=1.0,
        code_share=(0.5, 0.5, 0.5, 0.5),
        original_position_share=1.0,
        merge_share=merge_share,
        contextual_max=4,
        image_head_weight=0.5,
    )
    train.train_model(settings, feats, None)
    assert len(seen) == 3
    for step, (lengths, positions) in enumerate(seen):
        kept = kept_sizes[4 * step : 4 * step + 4]
        extra = [n - k for n, k in zip(lengths, kept, strict=True)]
        assert extra[:2] == [0, 0]  # scene codes have no tower features to merge
        if merge_share == 0.0:
            assert extra[2:] == [0, 0]
        else:  # real scenes: the same 1..contextual_max contextual tokens each, at their targets' positions
            assert extra[2] == extra[3] and 1 <= extra[2] <= 4
            for b in (2, 3):
                anchors = positions[b][kept[b] :]
                assert set(anchors.tolist()).isdisjoint(positions[b][: kept[b]].tolist())
                assert (np.diff(anchors) > 0).all() and anchors.max() < build.NUM_IMAGE_TOKENS


@pytest.mark.parametrize(("metadata", "expected"), [({"threads": 1}, 1), ({"threads": 2}, 2), ({}, 2), (None, 2)])
def test_a_rebuild_uses_the_recorded_thread_count(monkeypatch, tmp_path, metadata, expected):
    import vlmzip.default_model as default_model

    if metadata is not None:
        (tmp_path / "training_metadata.json").write_text(json.dumps(metadata))
    monkeypatch.setattr(default_model, "files_dir", lambda: tmp_path)
    monkeypatch.setattr(train.os, "cpu_count", lambda: 16)
    assert train.shipped_threads() == expected
    monkeypatch.setattr(train.os, "cpu_count", lambda: 1)
    assert train.shipped_threads() == 1


def test_train_main_has_its_own_parser(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    assert "--seed" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--steps", "0"], "--steps must be >= 1, got 0"),
        (["--steps", "-3"], "--steps must be >= 1, got -3"),
        (["--train-images", "2"], "--train-images must be >= 8 (scenes per training step), got 2"),
        (["--seed", "-1"], "--seed must be >= 0, got -1"),
        (["--precision", "half"], "argument --precision: invalid choice: 'half'"),
        (["--original-position-share", "-0.1"], "original_position_share must be in 0..1, got -0.1"),
        (["--threads", "3"], "--threads must be 1 or 2, got 3"),
        (["--object-share-min", "1.2"], "object_share_min must be in 0..1, got 1.2"),
        (["--merge-share", "2"], "merge_share must be in 0..1, got 2.0"),
        (["--sparse-share", "-1"], "sparse_share must be in 0..1, got -1.0"),
        (["--vision-feature-layer", "2"], "vision_feature_layer must be in -12..-1, got 2"),
        (["--vision-feature-layer", "-1.5"], "argument --vision-feature-layer: invalid int value"),
    ],
)
def test_train_default_refuses_bad_values_before_any_work(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(tmp_path / "out"), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_train_default_refuses_emulated_bfloat16_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train, "cpu_has_native_bf16", lambda: False)
    with pytest.raises(SystemExit) as exit_info:
        train.main([str(tmp_path / "out"), "--precision", "bfloat16"])
    assert exit_info.value.code == 2
    assert "precision='bfloat16' needs a CPU that computes bfloat16 natively" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_setting_flags_override_the_recorded_settings_and_nothing_else(tmp_path, monkeypatch):
    seen = {}
    monkeypatch.setattr(
        train, "train_default", lambda *args, **kwargs: seen.update(kwargs) or {"timings_s": {"total_s": 0}}
    )
    argv = ["--vision-feature-layer", "-1", "--steps", "7", "--sparse-share", "0.25", "--precision", "float32"]
    assert train.main([str(tmp_path / "out"), *argv]) == 0
    expected = replace(
        train.shipped_settings(), vision_feature_layer=-1, steps=7, sparse_share=0.25, precision="float32"
    )
    assert seen["settings"] == expected


class _Stop(Exception):
    """Raised by a stand-in to stop a run before training."""


def test_another_feature_layer_caches_its_own_features(tmp_path, monkeypatch):
    calls = []

    def record(split, n, seed, path, layer):
        calls.append((path.name, layer))
        raise _Stop

    monkeypatch.setattr(train, "extract_features", record)
    for layer, name in [(-1, "features-train-s0-n16-layer-1.npy"), (-2, "features-train-s0-n16.npy")]:
        settings = replace(train.TrainSettings(), train_images=16, vision_feature_layer=layer)
        with pytest.raises(_Stop):
            train.train_default(tmp_path / "out", settings=settings, threads=1)
        assert calls[-1] == (name, layer)


def test_feature_tower_stops_at_the_feature_layer():
    from recipes.default_model.features import TOWER_LAYERS, feature_tower

    assert len(feature_tower(-1).encoder.layer) == TOWER_LAYERS
    assert len(feature_tower(-2).encoder.layer) == TOWER_LAYERS - 1


@pytest.mark.parametrize(("metadata", "expected"), [({"vision_feature_layer": -1}, -1), ({}, -2), (None, -2)])
def test_assembled_model_reads_the_recorded_feature_layer(tmp_path, metadata, expected):
    import shutil

    from vlmzip.default_model import files_dir

    files = shutil.copytree(files_dir(), tmp_path / "files")
    (files / "training_metadata.json").unlink()
    if metadata is not None:
        (files / "training_metadata.json").write_text(json.dumps(metadata))
    assert build.recorded_feature_layer(files) == expected
    assert build.build_model_from_files(files).config.vision_feature_layer == expected
