"""Why a reduction method keeps or loses what the default model's questions need.

Two measurements on the held-out split, both at one budget (default 64 = 54 + 10):

* **Where the kept tokens fall** (tower only): the share of [CLS] attention that lands on object patches,
  the share of dominant tokens that sit on an object, how many objects of each size keep at least one token
  of their own, and the norm of contextual tokens relative to ordinary patch tokens.
* **Ablations of VisionZip** (language model too): the published merge (target + mean of the group) against
  a plain average, and the renumbered positions that LLaVA gives the kept tokens against their original
  positions in the 577-token sequence (``VisionZipConfig(positions="original")``: a contextual token at its
  merge target; also at the mean index of its group, as an earlier version of this analysis placed it), and
  renumbered image tokens followed by text at its original position (which part of the original scheme
  matters). Every setting is scored the same way: the answer is the argmax of the first generated token (all
  answers are single words of the closed vocabulary).

``python -m recipes.default_model.analysis`` prints both tables.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from recipes.default_model.budgets import accuracy_cells, load_recipe_model, parse_split_arguments, report
from vlmzip.default_model import build, data

# A patch counts as an object patch when its label (``data.patch_labels``) is not background.
_BACKGROUND = 0


@dataclass(frozen=True)
class Variant:
    """One reduced setting: a method at a budget, with its merge mode and position scheme."""

    label: str
    method: str
    merge: str = "target_plus_mean"
    original_positions: bool = False  # image tokens at their original positions, text at 577
    contextual_at: str = "target"  # with original positions: a contextual token at its merge target or "group mean"
    original_text: bool = False  # renumbered image tokens, text at its original position (577)


def default_variants(dominant: int, contextual: int) -> list[Variant]:
    dominant_only = f"dominant only ({dominant + contextual})"
    return [
        Variant("visionzip (target + mean, renumbered)", "visionzip"),
        Variant("visionzip, average merge", "visionzip", merge="average"),
        Variant("visionzip, original positions", "visionzip", original_positions=True),
        Variant(
            "visionzip, original positions, contextual at group mean", "visionzip", "target_plus_mean", True, "mean"
        ),
        Variant("visionzip, renumbered image, text at 577", "visionzip", original_text=True),
        Variant("visionzip, average merge + original positions", "visionzip", "average", True),
        Variant(dominant_only, "visionzip-dominant"),
        Variant(f"{dominant_only}, original positions", "visionzip-dominant", original_positions=True),
        Variant("pool", "pool"),
        Variant("random", "random"),
        Variant("random, original positions", "random", original_positions=True),
    ]


def token_positions(groups: torch.Tensor, kept_indices: torch.Tensor, contextual: int) -> torch.Tensor:
    """Original sequence positions of reduced tokens: dominant tokens at their own index, each contextual
    token at the mean index of the tokens merged into it. groups: (N,), kept_indices: (D,). Returns (D + C,)."""
    index = torch.arange(groups.shape[0], dtype=torch.float32)
    merged = [index[groups == j].mean() for j in range(contextual)]
    positions = kept_indices.to(torch.float32).tolist() + [float(m) for m in merged]
    return torch.tensor(positions).round().long()


@torch.inference_mode()
def first_token_answers(
    model, tokenizer, image_embeds: torch.Tensor, image_positions: torch.Tensor, num_image_tokens: int, questions
) -> list[int]:
    """Argmax token after each prompt. Image tokens sit at ``image_positions``; the text continues from
    ``num_image_tokens`` (577 keeps the text where it is with all tokens; T = renumbered as LLaVA does)."""
    prompts = [build.prompt_text_ids(tokenizer, q) for q in questions]
    tokens = image_embeds.shape[0]
    length = tokens + max(len(p) for p in prompts)
    embed = model.get_input_embeddings()
    rows, masks, positions = [], [], []
    for p in prompts:
        pad = length - tokens - len(p)  # left padding
        text = embed(torch.tensor([tokenizer.pad_token_id] * pad + p))
        rows.append(torch.cat([text[:pad], image_embeds.to(text.dtype), text[pad:]]))
        masks.append(torch.tensor([0] * pad + [1] * (tokens + len(p))))
        text_pos = torch.arange(num_image_tokens, num_image_tokens + len(p))
        positions.append(torch.cat([torch.zeros(pad, dtype=torch.long), image_positions, text_pos]))
    hidden = model.model.language_model(
        inputs_embeds=torch.stack(rows), attention_mask=torch.stack(masks), position_ids=torch.stack(positions)
    ).last_hidden_state
    return model.lm_head(hidden[:, -1]).argmax(-1).tolist()


@torch.inference_mode()
def analyse(
    model,
    processor,
    records: Sequence[data.Record],
    dominant: int = 54,
    contextual: int = 10,
    variants: Sequence[Variant] | None = None,
    images_per_batch: int = 8,
    seed: int = 0,
) -> dict:
    """Placement statistics and per-variant accuracy (see the module docstring) on ``records`` of the test
    split generated with ``seed``."""
    from vlmzip.config import VisionZipConfig, check_int
    from vlmzip.core import anchor_indices
    from vlmzip.methods import get_method
    from vlmzip.probe import probe_vision_tower

    VisionZipConfig(dominant=dominant, contextual=contextual)  # a bad budget fails before the tower runs
    images_per_batch = check_int("images_per_batch", images_per_batch, 1)
    model.eval()
    tokenizer = processor.tokenizer
    variants = list(variants or default_variants(dominant, contextual))
    needed = {("visionzip", "target_plus_mean"), ("random", "target_plus_mean")}  # placement statistics
    by_scene = data.group_by_scene(records)
    scenes = list(by_scene)
    hits: dict[str, dict[str, list[int]]] = {}
    stats: dict[str, list[float]] = {}
    kept_by_size: dict[str, list[int]] = {}

    def add(key: str, value: float) -> None:
        stats.setdefault(key, []).append(float(value))

    for start in range(0, len(scenes), images_per_batch):
        chunk = scenes[start : start + images_per_batch]
        pixels = processor.image_processor(images=[by_scene[s][0].image for s in chunk], return_tensors="pt")
        probe = probe_vision_tower(
            model.model.vision_tower, pixels["pixel_values"], feature_layer=model.config.vision_feature_layer
        )
        num_tokens = probe.features.shape[1]
        # Each method and merge mode reduces the chunk once, for the statistics and the variants alike.
        reductions = {
            (method, merge): get_method(method)(
                probe, VisionZipConfig(dominant=dominant, contextual=contextual, method=method, merge=merge)
            )
            for method, merge in {*needed, *((v.method, v.merge) for v in variants)}
        }
        vz, rnd = reductions["visionzip", "target_plus_mean"], reductions["random", "target_plus_mean"]
        patch_norm = probe.features[:, 1:].norm(dim=-1)  # (B, 576)
        for b, s in enumerate(chunk):
            objects = data.scene_objects(seed, "test", s)
            labels = torch.from_numpy(data.patch_labels(objects))
            on_object = labels != _BACKGROUND
            attention = probe.scores[b] / probe.scores[b].sum()
            add("object patch share", on_object.float().mean())
            add("[CLS] attention on object patches", attention[on_object].sum())
            kept_patches = vz.kept_indices[b][vz.kept_indices[b] > 0] - 1
            add("dominant tokens on objects", on_object[kept_patches].float().mean())
            random_kept = rnd.kept_indices[b][rnd.kept_indices[b] > 0] - 1
            add("random tokens on objects", on_object[random_kept].float().mean())
            median = patch_norm[b].median()
            add("dominant token norm / median patch norm", (patch_norm[b][kept_patches] / median).mean())
            add("contextual token norm / median patch norm", (vz.features[b, dominant:].norm(dim=-1) / median).mean())
            dominant_set = set(kept_patches.tolist())
            for obj in objects:
                own = data.patch_labels([obj]) != _BACKGROUND
                kept_by_size.setdefault(obj.size, []).append(int(bool(dominant_set & set(np.flatnonzero(own)))))
        # Language-model side: every variant on the same probe.
        settings: list[tuple[str, torch.Tensor, list[torch.Tensor], int]] = [
            ("full", probe.features, [torch.arange(num_tokens)] * len(chunk), num_tokens)
        ]
        for v in variants:
            red = reductions[v.method, v.merge]
            tokens = red.features.shape[1]
            if v.original_positions and v.contextual_at == "mean":
                pos = [token_positions(red.groups[b], red.kept_indices[b], contextual) for b in range(len(chunk))]
                settings.append((v.label, red.features, pos, num_tokens))
            elif v.original_positions:  # as VisionZipConfig(positions="original") places them ("full" strategy)
                settings.append((v.label, red.features, list(anchor_indices(red).unbind(0)), num_tokens))
            elif v.original_text:
                settings.append((v.label, red.features, [torch.arange(tokens)] * len(chunk), num_tokens))
            else:
                settings.append((v.label, red.features, [torch.arange(tokens)] * len(chunk), tokens))
        for label, feats, pos, text_start in settings:
            projected = model.model.multi_modal_projector(feats)
            for b, s in enumerate(chunk):
                recs = by_scene[s]
                pred = first_token_answers(
                    model, tokenizer, projected[b], pos[b], text_start, [r.question for r in recs]
                )
                for r, p in zip(recs, pred, strict=True):
                    ok = int(tokenizer.convert_ids_to_tokens(p) in r.answers)
                    hits.setdefault(label, {}).setdefault(r.type, []).append(ok)
        print(f"[analysis] {min(start + images_per_batch, len(scenes))}/{len(scenes)} scenes", flush=True)
    accuracy = {label: data.accuracy_summary(per_type) for label, per_type in hits.items()}
    placement = {k: float(np.mean(v)) for k, v in stats.items()}
    for size in data.SIZES:
        placement[f"{size} objects with a dominant token"] = float(np.mean(kept_by_size.get(size, [0])))
    return {"budget": [dominant, contextual], "placement": placement, "accuracy": accuracy}


def markdown(result: dict) -> str:
    types = list(data.QUESTION_TYPES)
    full = result["accuracy"]["full"]["overall"]
    lines = ["| quantity | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in result["placement"].items()]
    lines += ["", "| setting | overall | retained | " + " | ".join(types) + " |", "|---|---|---|" + "---|" * len(types)]
    for label, row in result["accuracy"].items():
        lines.append(f"| {label} | {accuracy_cells(row, full)} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Where VisionZip's tokens fall on the default model's scenes, and which of its choices cost accuracy."""
    parser = argparse.ArgumentParser(prog="python -m recipes.default_model.analysis", description=main.__doc__)
    parser.add_argument("--dominant", type=int, default=54)
    parser.add_argument("--contextual", type=int, default=10)
    args = parse_split_arguments(parser, argv)
    model, processor = load_recipe_model()
    result = analyse(
        model, processor, data.test_split(args.seed, args.images), args.dominant, args.contextual, seed=args.seed
    )
    return report(markdown(result), result, args.json)


if __name__ == "__main__":
    sys.exit(main())
