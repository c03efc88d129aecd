"""Rebuild the default model's weights from a seed (2 CPU cores, under an hour).

Steps: render scenes -> run the frozen DINOv2 tower once per scene and cache its layer -2 features (with
[CLS]) -> train projector + language model, reading exact "scene codes" of fresh scenes and the cached real
features side by side -> measure held-out accuracy with the assembled ``LlavaForConditionalGeneration`` ->
write the package payload. ``MODEL_CARD.md`` explains each part of the recipe.

Training packs many questions about one image into a single sequence. A block attention mask lets every
question see the image and its own tokens only, and its positions restart right after the image, so each
packed question is computed exactly as a stand-alone ``<image>\\nQuestion: ... Answer:`` prompt while the
image tokens are processed once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import nn

from recipes.default_model.evaluation import evaluate_cached, evaluate_llava
from recipes.default_model.features import TOWER_LAYERS, Progress, extract_features, feature_stats
from recipes.default_model.modeling import REFERENT_SPLITS, Packed, Packer, TrainableVLM, pad_images
from recipes.default_model.subsets import contextual_tokens, image_token_targets, subset_mode, token_subset
from vlmzip.default_model import build, data

# --------------------------------------------------------------------------- training


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN computes bfloat16 natively on this CPU (AVX-512 and newer)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


PRECISIONS = ("float32", "bfloat16", "auto")


def autocast_dtype(precision: str = "auto") -> torch.dtype:
    """Training precision: ``float32``, ``bfloat16`` autocast, or ``auto`` (bfloat16 where the CPU runs it
    natively, float32 elsewhere).

    Without native support bfloat16 matrix products are emulated: on a 2-core AVX2 machine a training step
    took 15 s in bfloat16 against 0.81-0.87 s in float32 (mean over a full run), so ``bfloat16`` is refused
    there. On a 2-core AMX machine bfloat16 gained little (0.57 against 0.59 s a step).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "float32":
        return torch.float32
    if precision == "bfloat16" and not cpu_has_native_bf16():
        raise ValueError(
            "precision='bfloat16' needs a CPU that computes bfloat16 natively (AVX-512 BF16 or AMX); "
            "this one would emulate it at ~17x the float32 step time: use 'float32' or 'auto'"
        )
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass
class TrainSettings:
    seed: int = 0
    train_images: int = 1440
    val_images: int = 48
    test_images: int = data.DEFAULT_TEST_IMAGES
    steps: int = 3400
    images_per_step: int = 8
    questions_per_type: int = 4
    # Counting is the hardest type: it gets this many questions per scene instead.
    count_questions: int = 6
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: int = 30
    eval_every: int = 500
    # Share of scenes in a step that are fresh scene codes rather than cached real scenes, by phase; the last
    # phase reads real scenes only, so that the answers are calibrated on the projector's actual output.
    code_share: tuple[float, ...] = (1.0, 0.5, 0.25, 0.0)
    # Where each phase but the last ends, as a fraction of the steps.
    phase_ends: tuple[float, ...] = (0.15, 0.7, 0.88)
    code_noise: float = 0.1
    label_noise: float = 0.03
    # Token subsets: share of scenes seen with every token, with an object-keeping subset, with a random one.
    full_share: float = 0.45
    object_subset_share: float = 0.45
    # Object-keeping subsets keep each object's centre patch and a share of its other patches drawn from
    # [object_share_min, 1); a reduction that keeps a token or two of a large object needs a low minimum.
    object_share_min: float = 0.3
    # Share of object-keeping subsets that keep almost no background (its share drawn from
    # [0, SPARSE_BACKGROUND_MAX) instead of [0, 1)): a 64-token reduction keeps about as many tokens as the
    # objects hold, while the default draw keeps ~300 tokens on median; 0 in the settings of earlier recipes,
    # which keep their random stream.
    sparse_share: float = 0.0
    # Share of the reduced steps whose subsets keep their original positions (each kept token at its index
    # among the 577, the questions from 577, as VisionZipConfig(positions="original") numbers them) instead
    # of renumbered ones; 0 in the settings of earlier recipes, which keep their random stream.
    original_position_share: float = 0.0
    # Share of the reduced steps whose real scenes also see the tokens their subset drops, merged into
    # 1..contextual_max contextual tokens after the kept ones (target + mean, as VisionZip merges them);
    # 0 in the settings of earlier recipes, which keep their random stream.
    merge_share: float = 0.0
    contextual_max: int = 30
    referent_weight: float = 0.5
    relation_weight: float = 0.5
    referent_layer: int = 2
    relation_layer: int = 3
    projector_mse_weight: float = 1.0
    projector_batch: int = 8
    # Dense supervision of the image tokens inside the language model (0 = off): at ``image_head_layer``,
    # each image token predicts whether it is the first kept token of its object in raster order (one such
    # token per object, which the causal image tokens can tell from the ones before them) and its class.
    image_head_weight: float = 0.0
    image_head_layer: int = 1
    # Matrix-product precision (see autocast_dtype). float32 is the one every CPU runs at full speed, so a
    # rebuild does not depend on native bfloat16 (float32 sums still depend on the thread count); "auto"
    # takes bfloat16 where it is native.
    precision: str = "float32"
    # The tower layer whose output feeds the projector (``hidden_states[layer]``; -2 as in LLaVA); VisionZip
    # then reads that layer's attention.
    vision_feature_layer: int = build.VISION_FEATURE_LAYER
    text_model: build.TextModelSize = field(default_factory=build.TextModelSize)


def shipped_metadata() -> dict | None:
    """``training_metadata.json`` of the shipped weights (None when none is recorded)."""
    from vlmzip.default_model import files_dir

    path = files_dir() / "training_metadata.json"
    return json.loads(path.read_text()) if path.is_file() else None


def shipped_threads() -> int:
    """The thread count the shipped weights were trained with (float32 sums depend on it), or the default
    of 2 where none is recorded; never more than this machine has."""
    recorded = (shipped_metadata() or {}).get("threads", 2)
    return max(1, min(int(recorded), os.cpu_count() or 1))


def shipped_settings() -> TrainSettings:
    """The settings recorded with the shipped weights (``TrainSettings()`` when none are recorded)."""
    metadata = shipped_metadata()
    if metadata is None:
        return TrainSettings()
    recorded = dict(metadata["settings"])
    text_model = build.TextModelSize(**recorded.pop("text_model"))
    known = {f for f in TrainSettings.__dataclass_fields__}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in recorded.items() if k in known}
    return TrainSettings(**values, text_model=text_model)


def _code_inputs(objects_list, rng: np.random.Generator, label_noise: float):
    labels = np.stack([data.patch_labels(o) for o in objects_list])
    centres = np.zeros_like(labels)
    for b, objects in enumerate(objects_list):
        centres[b, data.centre_patches(objects)] = 1
    clean = torch.from_numpy(labels)
    if label_noise:
        flip = rng.uniform(size=labels.shape) < label_noise
        labels = np.where(flip, rng.integers(0, data.NUM_PATCH_CLASSES, size=labels.shape), labels)
    return clean, torch.from_numpy(labels), torch.from_numpy(centres)


def _noun_targets(packed: Packed, batch, objects_list, tokenizer_offset: int = 2):
    """Referent and relation targets at the question's nouns: index tensors + target arrays."""
    ref_pos, ref_t, rel_pos, rel_t = [], [], [], []
    flat = [(q, objects_list[b]) for b, qs in enumerate(batch) for q in qs]
    for (q, objects), (row, start) in zip(flat, packed.question_start, strict=True):
        found = data.referents(q.question, objects)
        for word, matching in found:
            col = start + tokenizer_offset + word
            target = [min(len(matching), data.MAX_OBJECTS), -100, -100, -100, -100]
            if len(matching) == 1:
                o = matching[0]
                target[1:] = [data.SHAPES.index(o.shape), data.SIZES.index(o.size), *data.centre_cell(o)]
            ref_pos.append((row, col))
            ref_t.append(target)
        if len(found) == 2 and len(found[0][1]) == 1 and len(found[1][1]) == 1:
            a, b = found[0][1][0], found[1][1][0]
            dx, dy = b.x - a.x, b.y - a.y
            ok_x, ok_y = abs(dx) >= data.POSITION_MARGIN, abs(dy) >= data.POSITION_MARGIN
            bits = [float(dx > 0), float(dx < 0), float(dy > 0), float(dy < 0)]
            rel_pos.append((row, start + tokenizer_offset + found[1][0]))
            rel_t.append(bits + [float(ok_x)] * 2 + [float(ok_y)] * 2)
    return ref_pos, torch.tensor(ref_t, dtype=torch.long), rel_pos, torch.tensor(rel_t)


def _noun_losses(model: TrainableVLM, ref_hidden, rel_hidden, targets) -> tuple[torch.Tensor, torch.Tensor]:
    """Referent loss (count, and shape, size, row, column of single objects) and relation loss."""
    ref_pos, ref_t, rel_pos, rel_t = targets
    loss = ref_hidden.new_zeros(()).float()
    relation = ref_hidden.new_zeros(()).float()
    if ref_pos:
        rows, cols = torch.tensor(ref_pos).T
        out = model.referent_head(ref_hidden[rows, cols]).float().split(REFERENT_SPLITS, dim=-1)
        for k, logits in enumerate(out):
            if (ref_t[:, k] != -100).any():
                loss = loss + nn.functional.cross_entropy(logits, ref_t[:, k], ignore_index=-100)
    if rel_pos:
        rows, cols = torch.tensor(rel_pos).T
        logits = model.relation_head(rel_hidden[rows, cols]).float()
        bce = nn.functional.binary_cross_entropy_with_logits(logits, rel_t[:, :4], reduction="none")
        relation = (bce * rel_t[:, 4:]).sum() / rel_t[:, 4:].sum().clamp_min(1)
    return loss, relation


def _image_token_loss(model: TrainableVLM, image_hidden: torch.Tensor, targets) -> torch.Tensor:
    """Flag loss, balanced between first tokens and the others (about 7 against 570), plus class loss."""
    first, classes = targets
    out = model.image_head(image_hidden).float()
    valid = first != -100
    flag_logit, class_logits = out[..., 0][valid], out[..., 1:][valid]
    flag = first[valid].float()
    bce = nn.functional.binary_cross_entropy_with_logits(flag_logit, flag, reduction="none")
    balanced = 0.5 * (bce[flag == 1].mean() + bce[flag == 0].mean()) if (flag == 1).any() else bce.mean()
    return balanced + nn.functional.cross_entropy(class_logits, classes[valid])


def check_phases(settings: TrainSettings) -> None:
    """``code_share`` holds one share per phase in 0..1; ``phase_ends`` increase strictly inside (0, 1)."""
    shares, ends = tuple(settings.code_share), tuple(settings.phase_ends)
    if len(shares) != len(ends) + 1:
        raise ValueError(
            f"code_share needs one share per phase, len(phase_ends) + 1 = {len(ends) + 1}, got {len(shares)}"
        )
    if not all(0.0 <= s <= 1.0 for s in shares):
        raise ValueError(f"code_share values must be in 0..1, got {shares}")
    if not all(0.0 < e < 1.0 for e in ends) or any(a >= b for a, b in pairwise(ends)):
        raise ValueError(f"phase_ends must increase strictly inside (0, 1), got {ends}")


def check_settings(settings: TrainSettings) -> None:
    """Reject a schedule, loss weight, precision or head layer that cannot run (before any tower pass or
    training step)."""
    check_phases(settings)
    autocast_dtype(settings.precision)
    if not 0.0 <= settings.original_position_share <= 1.0:
        raise ValueError(f"original_position_share must be in 0..1, got {settings.original_position_share}")
    if not 0.0 <= settings.object_share_min <= 1.0:
        raise ValueError(f"object_share_min must be in 0..1, got {settings.object_share_min}")
    if not 0.0 <= settings.merge_share <= 1.0:
        raise ValueError(f"merge_share must be in 0..1, got {settings.merge_share}")
    if not 0.0 <= settings.sparse_share <= 1.0:
        raise ValueError(f"sparse_share must be in 0..1, got {settings.sparse_share}")
    if not -TOWER_LAYERS <= settings.vision_feature_layer <= -1:
        raise ValueError(f"vision_feature_layer must be in -{TOWER_LAYERS}..-1, got {settings.vision_feature_layer}")
    if not 1 <= settings.contextual_max <= build.NUM_IMAGE_TOKENS - 1:
        raise ValueError(f"contextual_max must be in 1..{build.NUM_IMAGE_TOKENS - 1}, got {settings.contextual_max}")
    for name in ("referent_weight", "relation_weight", "projector_mse_weight", "image_head_weight"):
        if not getattr(settings, name) >= 0:
            raise ValueError(f"{name} must be >= 0 (0 turns that loss off), got {getattr(settings, name)}")
    n_layers = settings.text_model.num_hidden_layers
    for name in ("referent_layer", "relation_layer", "image_head_layer"):
        if not 1 <= getattr(settings, name) <= n_layers:
            raise ValueError(f"{name} must be in 1..{n_layers} (num_hidden_layers), got {getattr(settings, name)}")


def code_share_at(settings: TrainSettings, step: int) -> float:
    """Share of scene-code scenes at ``step`` (the phase that the step's fraction of the run falls in)."""
    t = step / settings.steps
    return settings.code_share[sum(t >= e for e in settings.phase_ends)]


def train_model(settings: TrainSettings, train_feats: np.ndarray, val_feats: np.ndarray | None) -> TrainableVLM:
    """One run: the language model reads scene codes and real scenes side by side; the projector learns both
    from the task and by regression onto the scene codes. The share of real scenes grows by phase."""
    check_settings(settings)
    torch.manual_seed(settings.seed)
    config = build.build_config(settings.text_model, settings.vision_feature_layer)
    mean, std = feature_stats(train_feats)
    image_layer = settings.image_head_layer if settings.image_head_weight > 0 else None
    model = TrainableVLM(config, mean, std, image_head=image_layer is not None)
    packer = Packer(build.build_tokenizer())
    n_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("lm.", "linear_")))
    print(f"trainable parameters: {n_params / 1e6:.2f}M", flush=True)
    # Weight decay on weight matrices only: not on embeddings (token or scene-code), norms or biases.
    decayed = {n for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n and "coder" not in n}
    matrices = [p for n, p in model.named_parameters() if n in decayed]
    others = [p for n, p in model.named_parameters() if n not in decayed]
    opt = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": settings.weight_decay}, {"params": others, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        t = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng([settings.seed, 99])
    n_train = train_feats.shape[0]
    train_objects = [data.scene_objects(settings.seed, "train", i) for i in range(n_train)]
    fresh = 0
    progress = Progress(settings.steps, "train")
    losses: list[float] = []
    layers = (settings.referent_layer, settings.relation_layer)
    per_type = {**dict.fromkeys(data.QUESTION_TYPES, settings.questions_per_type), "count": settings.count_questions}
    precision = autocast_dtype(settings.precision)
    # Kept on the model so that the metadata records the precision this run used.
    model.training_precision = str(precision).removeprefix("torch.")
    print(f"matrix products in {model.training_precision}", flush=True)
    model.train()
    for step in range(settings.steps):
        n_code = int(round(code_share_at(settings, step) * settings.images_per_step))
        real_idx = np.sort(rng.choice(n_train, size=settings.images_per_step - n_code, replace=False))
        objects_list = []
        for _ in range(n_code):
            objects_list.append(data.scene_objects(settings.seed, "train", 1_000_000 + fresh))
            fresh += 1
        objects_list += [train_objects[i] for i in real_idx]
        batch = [data.sample_questions(o, rng, per_type) for o in objects_list]

        with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
            tokens: list[torch.Tensor] = []
            if n_code:
                _, noisy, centres = _code_inputs(objects_list[:n_code], rng, settings.label_noise)
                codes = model.coder(noisy, centres)
                codes = codes + settings.code_noise * torch.randn_like(codes)
                tokens += list(codes)
            # Projector regression onto the (fixed) codes of real training scenes, every step.
            mse_idx = np.unique(np.concatenate([real_idx, rng.choice(n_train, settings.projector_batch)]))
            clean, _, centres = _code_inputs([train_objects[i] for i in mse_idx], rng, 0.0)
            mse_features = torch.from_numpy(np.asarray(train_feats[mse_idx], dtype=np.float32))
            projected = model.project(mse_features)
            mse = nn.functional.mse_loss(projected.float(), model.coder(clean, centres).detach().float())
            where = {int(i): k for k, i in enumerate(mse_idx)}
            tokens += [projected[where[int(i)]] for i in real_idx]
            mode = subset_mode(rng, settings)
            subsets = [token_subset(o, rng, mode) for o in objects_list]
            tokens = [tok if s is None else tok[torch.from_numpy(s)] for tok, s in zip(tokens, subsets, strict=True)]
            # Each token's place among the 577 (a contextual token's is its target's).
            anchors = list(subsets)
            # Drawn only when the share is set, so that earlier settings keep their random stream.
            if mode.kind != "all" and settings.merge_share > 0 and rng.uniform() < settings.merge_share:
                count = int(rng.integers(1, settings.contextual_max + 1))
                for j, i in enumerate(real_idx):
                    b = n_code + j
                    merged, merged_anchors = contextual_tokens(mse_features[where[int(i)]], subsets[b], count)
                    tokens[b] = torch.cat([tokens[b], model.project(merged[None])[0].to(tokens[b].dtype)])
                    anchors[b] = np.concatenate([subsets[b], merged_anchors])
            original = mode.kind != "all" and settings.original_position_share > 0
            original = original and rng.uniform() < settings.original_position_share
            packed = packer.pack(batch, [tok.shape[0] for tok in tokens], image_positions=anchors if original else None)
            hidden, ref_hidden, rel_hidden, *image_hidden = model(
                pad_images(tokens),
                packed.input_ids,
                packed.mask,
                packed.position_ids,
                layers=layers,
                image_layer=image_layer,
            )
            image_loss = hidden.new_zeros(()).float()
            if image_hidden:
                targets_img = image_token_targets(objects_list, subsets, image_hidden[0].shape[1])
                image_loss = _image_token_loss(model, image_hidden[0], targets_img)
            sel = packed.labels != -100
            loss = nn.functional.cross_entropy(model.logits(hidden[sel]).float(), packed.labels[sel])
            targets = _noun_targets(packed, batch, objects_list)
            referent, relation = _noun_losses(model, ref_hidden, rel_hidden, targets)
        total = (
            loss
            + settings.referent_weight * referent
            + settings.relation_weight * relation
            + settings.projector_mse_weight * mse
            + settings.image_head_weight * image_loss
        )
        opt.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.update(
            step + 1,
            f"answer loss {np.mean(losses[-50:]):.4f} referent {referent.item():.3f} relation {relation.item():.3f} "
            f"mse {mse.item():.3f} "
            + (f"image {image_loss.item():.3f} " if image_hidden else "")
            + f"lr {sched.get_last_lr()[0]:.2e}",
        )
        if val_feats is not None and ((step + 1) % settings.eval_every == 0 or step + 1 == settings.steps):
            checks = [(None, False), (64, False)] + ([(64, True)] if settings.original_position_share > 0 else [])
            for keep_tokens, original in checks:
                acc = evaluate_cached(
                    model, packer, val_feats, "val", settings.seed, keep_tokens=keep_tokens, original_positions=original
                )
                label = "all tokens" if keep_tokens is None else f"random {keep_tokens}"
                label += ", original positions" if original else ""
                print(
                    f"[val, {label}] step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()),
                    flush=True,
                )
    model.eval()
    return model


# --------------------------------------------------------------------------- entry points


def train_default(
    output_dir: str | Path,
    seed: int = 0,
    work_dir: str | Path | None = None,
    settings: TrainSettings | None = None,
    evaluate: bool = True,
    threads: int | None = None,
) -> dict:
    """Rebuild the default model's package payload in ``output_dir`` (deterministic for a given seed).

    ``settings`` default to those recorded with the shipped weights, so the default call rebuilds them.
    ``work_dir`` keeps the feature caches (about 1 GB) so that reruns skip tower passes; defaults to
    ``output_dir/_work``. ``threads`` defaults to the recorded count (``shipped_threads``). Returns the
    training metadata (settings, timings, accuracies).
    """
    torch.set_num_threads(threads if threads is not None else shipped_threads())
    settings = settings or shipped_settings()
    if settings.seed != seed:
        settings = replace(settings, seed=seed)
    check_settings(settings)  # a bad value would otherwise surface after minutes of feature extraction
    output_dir = Path(output_dir)
    work_dir = Path(work_dir) if work_dir is not None else output_dir / "_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.time()

    def feats(split: str, n: int) -> np.ndarray:
        layer = settings.vision_feature_layer  # caches of layer -2 keep their earlier names
        suffix = "" if layer == build.VISION_FEATURE_LAYER else f"-layer{layer}"
        return extract_features(split, n, seed, work_dir / f"features-{split}-s{seed}-n{n}{suffix}.npy", layer=layer)

    train_feats = feats("train", settings.train_images)
    val_feats = feats("val", settings.val_images) if settings.val_images else None
    timings["features_s"] = time.time() - t0

    t1 = time.time()
    model = train_model(settings, train_feats, val_feats)
    timings["train_s"] = time.time() - t1
    # Everything trained, training-only heads and scene coder included, for inspecting a run.
    torch.save(model.state_dict(), work_dir / "trainable.pt")

    config = build.build_config(settings.text_model, settings.vision_feature_layer)
    meta = {
        "seed": seed,
        "settings": {**asdict(settings), "text_model": asdict(settings.text_model)},
        "parameters": {
            "language_model": sum(p.numel() for p in model.lm.parameters()),
            "projector": sum(p.numel() for n, p in model.named_parameters() if n.startswith("linear_")),
            "vision_tower": 22_056_576,
        },
        "image_tokens": build.NUM_IMAGE_TOKENS,
        "vision_feature_layer": config.vision_feature_layer,
        "timings_s": timings,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "autocast": model.training_precision,
    }
    _save_payload(model, settings, output_dir, meta)
    if evaluate:
        t2 = time.time()
        assembled = build.assemble_model_dir(output_dir, work_dir / "assembled")
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        llava = LlavaForConditionalGeneration.from_pretrained(str(assembled))
        processor = AutoProcessor.from_pretrained(str(assembled))
        full = evaluate_llava(llava, processor, data.test_split(seed, settings.test_images))
        (work_dir / "test_predictions.jsonl").write_text("".join(json.dumps(p) + "\n" for p in full.pop("predictions")))
        timings["evaluate_s"] = time.time() - t2
        meta["test_accuracy"] = full
        print(
            "[test, LlavaForConditionalGeneration] " + ", ".join(f"{k} {v:.3f}" for k, v in full.items()),
            flush=True,
        )
    timings["total_s"] = time.time() - t0
    _save_payload(model, settings, output_dir, meta)
    return meta


def _save_payload(model: TrainableVLM, settings: TrainSettings, output_dir: Path, meta: dict) -> None:
    build.save_shipped_files(model.export_state_dict(), settings.text_model, output_dir, meta)


# Command-line flags that override one recorded setting each (the flag's name is the setting's).
SETTING_FLAGS: tuple[tuple[str, type, str], ...] = (
    ("--steps", int, "training steps"),
    ("--train-images", int, "training scenes"),
    ("--original-position-share", float, "share of reduced training steps that keep original positions"),
    ("--object-share-min", float, "least share of an object's other patches that an object-keeping subset keeps"),
    ("--merge-share", float, "share of reduced training steps whose dropped tokens are merged into contextual tokens"),
    ("--sparse-share", float, "share of object-keeping subsets that keep almost no background"),
    ("--vision-feature-layer", int, "tower layer whose output feeds the projector (-2 as in LLaVA)"),
)
PRECISION_HELP = "matrix-product precision (default: as recorded, float32; 'auto' takes bfloat16 where native)"


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m recipes.default_model.train``: rebuild the default model from a seed."""
    parser = argparse.ArgumentParser(prog="python -m recipes.default_model.train", description=main.__doc__)
    parser.add_argument("output_dir", type=Path, help="where to write the model payload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="feature caches (default: OUTPUT_DIR/_work)")
    for flag, kind, help_text in SETTING_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=f"{help_text} (default: as recorded)")
    parser.add_argument("--precision", choices=PRECISIONS, default=None, help=PRECISION_HELP)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads, 1 or 2 (default: as recorded with the shipped weights)",
    )
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = parser.parse_args(argv)
    recorded = shipped_settings()
    # Checked before any tower pass: a bad value would otherwise surface after minutes of feature extraction.
    if args.seed < 0:
        parser.error(f"--seed must be >= 0, got {args.seed}")
    if args.steps is not None and args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    if args.train_images is not None and args.train_images < recorded.images_per_step:
        parser.error(
            f"--train-images must be >= {recorded.images_per_step} (scenes per training step), got {args.train_images}"
        )
    names = [flag[2:].replace("-", "_") for flag, _, _ in SETTING_FLAGS] + ["precision"]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.threads is not None and args.threads not in (1, 2):
        parser.error(f"--threads must be 1 or 2, got {args.threads}")
    from vlmzip.outputs import embedded_model_inputs, refuse_overlap

    try:  # the shipped weights and their assembled copy are read, never overwritten
        refuse_overlap(args.output_dir, embedded_model_inputs(), "OUTPUT_DIR")
        if args.work_dir is not None:
            refuse_overlap(args.work_dir, embedded_model_inputs(), "--work-dir")
    except ValueError as exc:
        parser.error(str(exc))
    settings = replace(recorded, seed=args.seed, **overrides)
    try:
        check_settings(settings)
    except ValueError as exc:
        parser.error(str(exc))
    meta = train_default(
        args.output_dir,
        seed=args.seed,
        work_dir=args.work_dir,
        settings=settings,
        evaluate=not args.no_eval,
        threads=args.threads,
    )
    acc = meta.get("test_accuracy")
    if acc:
        print(f"held-out accuracy: {acc['overall']:.4f} on {acc['questions']} questions")
    print(f"total {meta['timings_s']['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
