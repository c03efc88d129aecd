"""Exact-match accuracy of the assembled default model, run through stock transformers `generate`, and of
a model in training, from cached tower features."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from recipes.default_model.features import Progress
from recipes.default_model.modeling import Packer, TrainableVLM, pad_images
from recipes.default_model.subsets import SubsetMode, token_subset
from vlmzip.default_model import data


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
    progress = Progress(len(scenes), "evaluate")
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


@torch.inference_mode()
def evaluate_cached(
    model: TrainableVLM,
    packer: Packer,
    features: np.ndarray,
    split: str,
    seed: int,
    batch_images: int = 8,
    keep_tokens: int | None = None,
    original_positions: bool = False,
) -> dict[str, float]:
    """Exact-match accuracy on a split from cached features (one question of each type per scene).

    ``keep_tokens``: see only [CLS] and a random set of patches, this many tokens in all, numbered
    ``0..keep_tokens-1`` or, with ``original_positions``, at their indices among the 577.
    """
    model.eval()
    per_type: dict[str, list[int]] = {}
    n = features.shape[0]
    rng = np.random.default_rng([seed, 7])
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
        tokens = list(model.project(torch.from_numpy(np.asarray(features[idx], dtype=np.float32))))
        positions = None
        if keep_tokens is not None:
            mode = SubsetMode("random", size=keep_tokens - 1)
            subsets = [token_subset((), rng, mode) for _ in tokens]
            tokens = [t[torch.from_numpy(s)] for t, s in zip(tokens, subsets, strict=True)]
            positions = subsets if original_positions else None
        packed = packer.pack(batch, [t.shape[0] for t in tokens], with_answers=False, image_positions=positions)
        (hidden,) = model(pad_images(tokens), packed.input_ids, packed.mask, packed.position_ids)
        rows = torch.tensor([r for r, _ in packed.answer_pos])
        cols = torch.tensor([c for _, c in packed.answer_pos])
        pred = model.logits(hidden[rows, cols]).argmax(-1).tolist()
        flat = [q for qs in batch for q in qs]
        for q, p in zip(flat, pred, strict=True):
            per_type.setdefault(q.type, []).append(int(packer.answer_id(q.answer) == p))
    model.train()
    return data.accuracy_summary(per_type)
