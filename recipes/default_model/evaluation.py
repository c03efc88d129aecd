"""Exact-match accuracy of the assembled default model, run through stock transformers `generate`."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from recipes.default_model.features import Progress
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
