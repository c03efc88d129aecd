"""Rebuild the default model's weights from a seed (2 CPU cores, under an hour).

Steps: render scenes -> run the frozen DINOv2 tower once per scene and cache its layer -2 features (with
[CLS]) -> train projector + language model on the cached features -> measure held-out accuracy with the
assembled ``LlavaForConditionalGeneration`` -> write the package payload.

Training packs many questions about one image into a single sequence. A block attention mask lets every
question see the image and its own tokens only, and its positions restart right after the image, so each
packed question is computed exactly as a stand-alone ``<image>\\nQuestion: ... Answer:`` prompt while the
577 image tokens are processed once.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import build, data

FEATURE_DIM = 384


class _Progress:
    """Minimal progress line (rich when available, plain prints otherwise)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.start, self.last = total, label, time.time(), 0.0

    def update(self, done: int, extra: str = "") -> None:
        now = time.time()
        if now - self.last < 10 and done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        print(f"[{self.label}] {done}/{self.total} {elapsed:6.0f}s elapsed, eta {eta:5.0f}s {extra}", flush=True)


# --------------------------------------------------------------------------- feature cache


def feature_tower():
    """The frozen tower truncated after the feature layer (layer -2): the last layer is never needed."""
    from .convert import load_dinov2_from_onnx

    tower = load_dinov2_from_onnx()
    tower.encoder.layer = tower.encoder.layer[: len(tower.encoder.layer) + build.VISION_FEATURE_LAYER + 1]
    return tower.eval()


@torch.inference_mode()
def extract_features(split: str, num_images: int, seed: int, path: Path, batch_size: int = 8) -> np.ndarray:
    """Cache ``hidden_states[-2]`` (float16, (N, 577, 384)) of ``num_images`` scenes; reuse if present."""
    path = Path(path)
    if path.is_file():
        feats = np.load(path, mmap_mode="r")
        if feats.shape == (num_images, build.NUM_IMAGE_TOKENS, FEATURE_DIM):
            return feats
    tower = feature_tower()
    processor = build.build_image_processor()
    out = np.lib.format.open_memmap(
        path.with_suffix(".tmp.npy"),
        mode="w+",
        dtype=np.float16,
        shape=(num_images, build.NUM_IMAGE_TOKENS, FEATURE_DIM),
    )
    progress = _Progress(num_images, f"features:{split}")
    for start in range(0, num_images, batch_size):
        stop = min(start + batch_size, num_images)
        images = [data.generate_scene(seed, split, i).image for i in range(start, stop)]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        out[start:stop] = hidden.to(torch.float16).numpy()
        progress.update(stop)
    out.flush()
    del out
    path.with_suffix(".tmp.npy").rename(path)
    return np.load(path, mmap_mode="r")


def feature_stats(features: np.ndarray, num_images: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the tower features (DINOv2 layer outputs are not normalised)."""
    sample = torch.from_numpy(np.asarray(features[:num_images], dtype=np.float32)).reshape(-1, FEATURE_DIM)
    return sample.mean(0), sample.std(0).clamp_min(1e-3)


# --------------------------------------------------------------------------- model


class TrainableVLM(nn.Module):
    """Projector + Llama LM over cached tower features; maps 1:1 onto ``LlavaForConditionalGeneration``.

    The projector input is standardised with fixed statistics during training; the standardisation is
    folded into ``linear_1`` on export, so the shipped model reads raw tower features.
    """

    def __init__(self, config, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        from transformers import LlamaForCausalLM

        text = config.text_config
        self.register_buffer("feat_mean", mean.clone())
        self.register_buffer("feat_std", std.clone())
        self.linear_1 = nn.Linear(FEATURE_DIM, text.hidden_size)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(text.hidden_size, text.hidden_size)
        self.lm = LlamaForCausalLM(text)
        # Training-only heads (never exported): dense per-patch targets teach the image positions to carry
        # object identity early, which the question tokens then learn to read.
        self.aux_patch = nn.Linear(text.hidden_size, data.NUM_PATCH_CLASSES)
        self.aux_count = nn.Linear(text.hidden_size, data.NUM_SUMMARY_COUNTS * (data.MAX_OBJECTS + 1))

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1((features - self.feat_mean) / self.feat_std)))

    def forward(self, features, input_ids, attention_mask, position_ids, aux_layer: int | None = None):
        """Text-position hidden states; with ``aux_layer``, also that layer's image-position states."""
        image = self.project(features)
        text = self.lm.get_input_embeddings()(input_ids)
        embeds = torch.cat([image, text], dim=1)
        hidden = self.lm.model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            output_hidden_states=aux_layer is not None,
        )
        text_hidden = hidden.last_hidden_state[:, image.shape[1] :]
        if aux_layer is None:
            return text_hidden
        return text_hidden, hidden.hidden_states[aux_layer][:, : image.shape[1]]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm.lm_head(hidden)

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under ``LlavaForConditionalGeneration`` names, with the input standardisation folded in."""
        w1 = self.linear_1.weight.detach() / self.feat_std[None, :]
        b1 = self.linear_1.bias.detach() - w1 @ self.feat_mean
        state = {
            "model.multi_modal_projector.linear_1.weight": w1,
            "model.multi_modal_projector.linear_1.bias": b1,
            "model.multi_modal_projector.linear_2.weight": self.linear_2.weight.detach(),
            "model.multi_modal_projector.linear_2.bias": self.linear_2.bias.detach(),
        }
        for key, value in self.lm.state_dict().items():
            if key.endswith("inv_freq"):
                continue
            if key.startswith("model."):
                state["model.language_model." + key[len("model.") :]] = value.detach()
            else:
                state[key] = value.detach()
        return {k: v.float().contiguous().clone() for k, v in state.items()}


# --------------------------------------------------------------------------- packing


@dataclass
class Packer:
    """Turns (image index, questions) into packed sequences with block masks."""

    tokenizer: object
    cache: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.eos = self.tokenizer.eos_token_id
        self.pad = self.tokenizer.pad_token_id

    def prompt_ids(self, question: str) -> list[int]:
        # Same tokens the processor produces after the image placeholders.
        if question not in self.cache:
            self.cache[question] = build.prompt_text_ids(self.tokenizer, question)
        return self.cache[question]

    def answer_id(self, answer: str) -> int:
        return self.tokenizer.convert_tokens_to_ids(answer)

    def pack(self, batch: Sequence[Sequence[data.Question]], with_answers: bool = True):
        """Returns input_ids, labels, 4-D bool mask, position ids and (row, col) of each answer prediction."""
        n_img = build.NUM_IMAGE_TOKENS
        rows, labels, segments, answer_pos = [], [], [], []
        for b, questions in enumerate(batch):
            ids, lab, seg = [], [], []
            for j, q in enumerate(questions):
                p = self.prompt_ids(q.question)
                tail = [self.answer_id(q.answer), self.eos] if with_answers else []
                answer_pos.append((b, len(ids) + len(p) - 1))
                ids += p + tail
                lab += [-100] * (len(p) - 1) + ([self.answer_id(q.answer), self.eos, -100] if with_answers else [-100])
                seg += [j] * (len(p) + len(tail))
            rows.append(ids)
            labels.append(lab)
            segments.append(seg)
        length = max(len(r) for r in rows)
        bsz = len(rows)
        input_ids = torch.full((bsz, length), self.pad, dtype=torch.long)
        label_t = torch.full((bsz, length), -100, dtype=torch.long)
        seg_t = torch.full((bsz, length), -1, dtype=torch.long)
        pos_t = torch.zeros((bsz, n_img + length), dtype=torch.long)
        pos_t[:, :n_img] = torch.arange(n_img)
        for b, (ids, lab, seg) in enumerate(zip(rows, labels, segments, strict=True)):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            label_t[b, : len(lab)] = torch.tensor(lab[: len(ids)])
            seg_t[b, : len(seg)] = torch.tensor(seg)
            # Each question restarts right after the image, exactly like a stand-alone prompt.
            pos = []
            prev, k = None, 0
            for s in seg:
                k = k + 1 if s == prev else 0
                prev = s
                pos.append(n_img + k)
            pos_t[b, n_img : n_img + len(pos)] = torch.tensor(pos)
            pos_t[b, n_img + len(pos) :] = n_img
        total = n_img + length
        full_seg = torch.cat([torch.full((bsz, n_img), -2, dtype=torch.long), seg_t], dim=1)
        idx = torch.arange(total)
        causal = idx[None, :] <= idx[:, None]
        q_seg, k_seg = full_seg[:, :, None], full_seg[:, None, :]
        allowed = (k_seg == -2) | ((q_seg == k_seg) & (q_seg >= 0))
        allowed = allowed & causal[None]
        allowed |= torch.eye(total, dtype=torch.bool)[None]  # padding rows attend to themselves only
        return input_ids, label_t, allowed[:, None], pos_t, answer_pos


# --------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    seed: int = 0
    train_images: int = 1440
    val_images: int = 48
    test_images: int = data.DEFAULT_TEST_IMAGES
    steps: int = 1200
    images_per_step: int = 8
    questions_per_type: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 30
    eval_every: int = 200
    aux_weight: float = 0.5
    aux_layer: int = 2
    projector_steps: int = 1000
    projector_batch: int = 16
    text_model: build.TextModelSize = field(default_factory=build.TextModelSize)


def shipped_settings() -> TrainSettings:
    """The settings recorded with the shipped weights (``TrainSettings()`` when none are recorded)."""
    from . import files_dir

    path = files_dir() / "training_metadata.json"
    if not path.is_file():
        return TrainSettings()
    recorded = dict(json.loads(path.read_text())["settings"])
    text_model = build.TextModelSize(**recorded.pop("text_model"))
    known = {f for f in TrainSettings.__dataclass_fields__}
    return TrainSettings(**{k: v for k, v in recorded.items() if k in known}, text_model=text_model)


def _questions_for(seed: int, split: str, index: int, rng: np.random.Generator, per_type: int):
    return data.sample_questions(data.scene_objects(seed, split, index), rng, per_type=per_type)


@torch.inference_mode()
def evaluate_cached(
    model: TrainableVLM, packer: Packer, features: np.ndarray, split: str, seed: int, batch_images: int = 8
) -> dict[str, float]:
    """Exact-match accuracy on a split from cached features (one question of each type per scene)."""
    model.eval()
    per_type: dict[str, list[int]] = {}
    n = features.shape[0]
    for start in range(0, n, batch_images):
        idx = list(range(start, min(start + batch_images, n)))
        batch = [
            data.sample_questions(
                data.scene_objects(seed, split, i),
                np.random.default_rng([seed, data._SPLIT_IDS[split], i, 2]),
                per_type=1,
            )
            for i in idx
        ]
        feats = torch.from_numpy(np.asarray(features[idx], dtype=np.float32))
        input_ids, _, mask, pos, answer_pos = packer.pack(batch, with_answers=False)
        hidden = model(feats, input_ids, mask, pos)
        rows = torch.tensor([r for r, _ in answer_pos])
        cols = torch.tensor([c for _, c in answer_pos])
        pred = model.logits(hidden[rows, cols]).argmax(-1).tolist()
        flat = [q for qs in batch for q in qs]
        for q, p in zip(flat, pred, strict=True):
            per_type.setdefault(q.type, []).append(int(packer.answer_id(q.answer) == p))
    model.train()
    return data.accuracy_summary(per_type)


def pretrain_projector(model: TrainableVLM, settings: TrainSettings, train_feats: np.ndarray) -> None:
    """Stage 1: align the projector with dense per-patch targets (shape and size under every patch, and the
    scene's counts from the mean of all projected tokens) before the language model is trained.

    Cheap (no language model involved) and it makes the image tokens, and their plain average, informative
    from the first step of stage 2; without it the language model stays on answer priors for a long time.
    """
    hidden = model.linear_2.out_features
    patch_head = nn.Linear(hidden, data.NUM_PATCH_CLASSES)
    count_head = nn.Linear(hidden, data.NUM_SUMMARY_COUNTS * (data.MAX_OBJECTS + 1))
    params = [
        *model.linear_1.parameters(),
        *model.linear_2.parameters(),
        *patch_head.parameters(),
        *count_head.parameters(),
    ]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    rng = np.random.default_rng([settings.seed, 98])
    n_train = train_feats.shape[0]
    objects = [data.scene_objects(settings.seed, "train", i) for i in range(n_train)]
    patch_all = np.stack([data.patch_labels(o) for o in objects])
    count_all = np.stack([data.summary_counts(o) for o in objects])
    progress = _Progress(settings.projector_steps, "projector")
    losses: list[float] = []
    for step in range(settings.projector_steps):
        idx = np.sort(rng.choice(n_train, size=settings.projector_batch, replace=False))
        feats = torch.from_numpy(np.asarray(train_feats[idx], dtype=np.float32))
        tokens = model.project(feats)
        loss = nn.functional.cross_entropy(
            patch_head(tokens[:, 1:]).flatten(0, 1), torch.from_numpy(patch_all[idx]).flatten()
        )
        counts = count_head(tokens.mean(1)).view(len(idx), data.NUM_SUMMARY_COUNTS, -1)
        loss = loss + nn.functional.cross_entropy(counts.flatten(0, 1), torch.from_numpy(count_all[idx]).flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        progress.update(step + 1, f"loss {np.mean(losses[-20:]):.4f}")


def train_model(settings: TrainSettings, train_feats: np.ndarray, val_feats: np.ndarray | None) -> TrainableVLM:
    torch.manual_seed(settings.seed)
    config = build.build_config(settings.text_model)
    mean, std = feature_stats(train_feats)
    model = TrainableVLM(config, mean, std)
    packer = Packer(build.build_tokenizer())
    n_params = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("aux_"))
    print(f"trainable parameters: {n_params / 1e6:.2f}M", flush=True)
    if settings.projector_steps:
        pretrain_projector(model, settings, train_feats)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=settings.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        t = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    rng = np.random.default_rng([settings.seed, 99])
    n_train = train_feats.shape[0]
    order = rng.permutation(n_train)
    cursor = 0
    progress = _Progress(settings.steps, "train")
    losses: list[float] = []
    model.train()
    for step in range(settings.steps):
        if cursor + settings.images_per_step > n_train:
            order, cursor = rng.permutation(n_train), 0
        idx = np.sort(order[cursor : cursor + settings.images_per_step])
        cursor += settings.images_per_step
        batch = [_questions_for(settings.seed, "train", int(i), rng, settings.questions_per_type) for i in idx]
        feats = torch.from_numpy(np.asarray(train_feats[idx], dtype=np.float32))
        input_ids, labels, mask, pos, _ = packer.pack(batch)
        use_aux = settings.aux_weight > 0
        out = model(feats, input_ids, mask, pos, aux_layer=settings.aux_layer if use_aux else None)
        hidden, image_hidden = out if use_aux else (out, None)
        # Only answer and end-of-answer positions carry a loss: project just those rows.
        sel = labels != -100
        logits = model.logits(hidden[sel])
        loss = nn.functional.cross_entropy(logits, labels[sel])
        if image_hidden is not None:
            objects = [data.scene_objects(settings.seed, "train", int(i)) for i in idx]
            patch_t = torch.from_numpy(np.stack([data.patch_labels(o) for o in objects]))
            count_t = torch.from_numpy(np.stack([data.summary_counts(o) for o in objects]))
            aux = nn.functional.cross_entropy(model.aux_patch(image_hidden[:, 1:]).flatten(0, 1), patch_t.flatten())
            # The last image position is the first to have seen every patch (causal attention).
            counts = model.aux_count(image_hidden[:, -1]).view(len(idx), data.NUM_SUMMARY_COUNTS, -1)
            aux = aux + nn.functional.cross_entropy(counts.flatten(0, 1), count_t.flatten())
            loss = loss + settings.aux_weight * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        progress.update(step + 1, f"loss {np.mean(losses[-50:]):.4f} lr {sched.get_last_lr()[0]:.2e}")
        if val_feats is not None and ((step + 1) % settings.eval_every == 0 or step + 1 == settings.steps):
            acc = evaluate_cached(model, packer, val_feats, "val", settings.seed)
            print(f"[val] step {step + 1}: " + ", ".join(f"{k} {v:.3f}" for k, v in acc.items()), flush=True)
    model.eval()
    return model


# ------------------------------------------------------------------------- evaluation of the assembled model


@torch.inference_mode()
def evaluate_llava(model, processor, records: Sequence[data.Record], images_per_batch: int = 8) -> dict:
    """Exact match of ``generate`` on records with the stock LLaVA model and processor.

    The tower runs once per scene (through ``get_image_features``); every question of that scene then goes
    through the language model via ``generate``, the processor's 577 placeholders filled with those features.
    """
    model.eval()
    tokenizer = processor.tokenizer
    by_scene = data.group_by_scene(records)
    scenes = list(by_scene)
    per_type: dict[str, list[int]] = {}
    predictions = []
    progress = _Progress(len(scenes), "evaluate")
    embed = model.get_input_embeddings()
    for start in range(0, len(scenes), images_per_batch):
        chunk = scenes[start : start + images_per_batch]
        pixels = processor.image_processor(images=[by_scene[s][0].image for s in chunk], return_tensors="pt")
        feats = model.get_image_features(pixel_values=pixels["pixel_values"].to(model.dtype)).pooler_output
        for s, image_feats in zip(chunk, feats, strict=True):
            recs = by_scene[s]
            enc = processor(
                images=[r.image for r in recs],
                text=[data.format_prompt(r.question) for r in recs],
                return_tensors="pt",
                padding=True,
            )
            ids = enc["input_ids"]
            embeds = embed(ids)
            is_image = ids == model.config.image_token_id
            embeds[is_image] = image_feats.to(embeds.dtype).repeat(len(recs), 1)
            out = model.generate(
                inputs_embeds=embeds, attention_mask=enc["attention_mask"], max_new_tokens=4, do_sample=False
            )
            texts = tokenizer.batch_decode(out[:, -4:] if out.shape[1] > 4 else out, skip_special_tokens=True)
            for r, text in zip(recs, texts, strict=True):
                pred = text.strip()
                ok = int(pred in r.answers)
                per_type.setdefault(r.type, []).append(ok)
                predictions.append(
                    {
                        "question": r.question,
                        "answer": r.answers[0],
                        "prediction": pred,
                        "type": r.type,
                        "scene": s,
                    }
                )
        progress.update(min(start + images_per_batch, len(scenes)))
    result = data.accuracy_summary(per_type)
    result["predictions"] = predictions
    return result


# --------------------------------------------------------------------------- entry points


def train_default(
    output_dir: str | Path,
    seed: int = 0,
    work_dir: str | Path | None = None,
    settings: TrainSettings | None = None,
    evaluate: bool = True,
) -> dict:
    """Rebuild the default model's package payload in ``output_dir`` (deterministic for a given seed).

    ``settings`` default to those recorded with the shipped weights, so the default call rebuilds them.
    ``work_dir`` keeps the feature caches (about 1 GB) so that reruns skip tower passes; defaults to
    ``output_dir/_work``. Returns the training metadata (settings, timings, accuracies).
    """
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = settings or shipped_settings()
    if settings.seed != seed:
        settings = replace(settings, seed=seed)
    output_dir = Path(output_dir)
    work_dir = Path(work_dir) if work_dir is not None else output_dir / "_work"
    work_dir.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.time()

    def feats(split: str, n: int) -> np.ndarray:
        return extract_features(split, n, seed, work_dir / f"features-{split}-s{seed}-n{n}.npy")

    train_feats = feats("train", settings.train_images)
    val_feats = feats("val", settings.val_images) if settings.val_images else None
    timings["features_s"] = time.time() - t0

    t1 = time.time()
    model = train_model(settings, train_feats, val_feats)
    timings["train_s"] = time.time() - t1

    config = build.build_config(settings.text_model)
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


def main(argv: Sequence[str] | None = None) -> int:
    """``visionzip train-default``: rebuild the default model from a seed."""
    parser = argparse.ArgumentParser(prog="visionzip train-default", description=main.__doc__)
    parser.add_argument("output_dir", type=Path, help="where to write the model payload")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work-dir", type=Path, default=None, help="feature caches (default: OUTPUT_DIR/_work)")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="stage-2 training steps (default: as recorded with the shipped weights)",
    )
    parser.add_argument("--train-images", type=int, default=None)
    parser.add_argument("--no-eval", action="store_true", help="skip the held-out evaluation")
    args = parser.parse_args(argv)
    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.train_images is not None:
        overrides["train_images"] = args.train_images
    settings = replace(shipped_settings(), seed=args.seed, **overrides)
    meta = train_default(
        args.output_dir, seed=args.seed, work_dir=args.work_dir, settings=settings, evaluate=not args.no_eval
    )
    acc = meta.get("test_accuracy")
    if acc:
        print(f"held-out accuracy: {acc['overall']:.4f} on {acc['questions']} questions")
    print(f"total {meta['timings_s']['total_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
