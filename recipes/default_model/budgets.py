"""Held-out accuracy of the default model when its 577 visual tokens are reduced.

The tower runs once per scene through :func:`vlmzip.probe.probe_vision_tower` (stopping after layer -2);
every reduction method then works on that probe, its tokens go through the model's projector, and the
language model answers each question from a prompt holding exactly as many image placeholders as tokens
were kept (what ``vlmzip.apply`` does for LLaVA, without re-running the tower per method).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from vlmzip.default_model import build, data

# (dominant, contextual) splits of the VisionZip paper for LLaVA-1.5.
PAPER_BUDGETS = ((162, 30), (108, 20), (54, 10))
DEFAULT_METHODS = ("visionzip", "pool", "random")


@torch.inference_mode()
def _answer(model, tokenizer, image_embeds: torch.Tensor, questions: Sequence[str]) -> list[str]:
    """Greedy answers for questions about one image whose projected tokens are ``image_embeds`` (T, d)."""
    image_id = model.config.image_token_id
    tokens = image_embeds.shape[0]
    rows = [[image_id] * tokens + build.prompt_text_ids(tokenizer, q) for q in questions]
    length = max(len(r) for r in rows)
    ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):  # left padding, as for generation
        ids[i, length - len(row) :] = torch.tensor(row)
        mask[i, length - len(row) :] = 1
    embeds = model.get_input_embeddings()(ids)
    embeds[ids == image_id] = image_embeds.to(embeds.dtype).repeat(len(rows), 1)
    out = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=4, do_sample=False)
    return [t.strip() for t in tokenizer.batch_decode(out, skip_special_tokens=True)]


@torch.inference_mode()
def evaluate_budgets(
    model,
    processor,
    records: Sequence[data.Record],
    budgets: Sequence[tuple[int, int]] = PAPER_BUDGETS,
    methods: Sequence[str] = DEFAULT_METHODS,
    images_per_batch: int = 8,
) -> dict[str, dict]:
    """Exact-match accuracy per ``"method@tokens"`` (plus ``"full@577"``), overall and per question type."""
    from vlmzip.config import VisionZipConfig, check_int
    from vlmzip.methods import get_method
    from vlmzip.probe import probe_vision_tower

    for dominant, contextual in budgets:  # bad budgets and methods fail before the tower runs
        for method in methods:
            VisionZipConfig(dominant=dominant, contextual=contextual, method=method)
    images_per_batch = check_int("images_per_batch", images_per_batch, 1)
    model.eval()
    tokenizer = processor.tokenizer
    by_scene = data.group_by_scene(records)
    scenes = list(by_scene)
    settings = [("full", 0, 0)] + [(m, d, c) for d, c in budgets for m in methods]
    hits: dict[str, dict[str, list[int]]] = {}
    start_time = time.time()
    for start in range(0, len(scenes), images_per_batch):
        chunk = scenes[start : start + images_per_batch]
        pixels = processor.image_processor(images=[by_scene[s][0].image for s in chunk], return_tensors="pt")
        probe = probe_vision_tower(
            model.model.vision_tower, pixels["pixel_values"], feature_layer=model.config.vision_feature_layer
        )
        for method, dominant, contextual in settings:
            if method == "full":
                label, feats = f"full@{probe.features.shape[1]}", probe.features
            else:
                config = VisionZipConfig(dominant=dominant, contextual=contextual, method=method)
                label, feats = f"{method}@{dominant + contextual}", get_method(method)(probe, config).features
            projected = model.model.multi_modal_projector(feats)
            for s, image_embeds in zip(chunk, projected, strict=True):
                recs = by_scene[s]
                answers = _answer(model, tokenizer, image_embeds, [r.question for r in recs])
                for r, a in zip(recs, answers, strict=True):
                    hits.setdefault(label, {}).setdefault(r.type, []).append(int(a in r.answers))
        done = min(start + images_per_batch, len(scenes))
        print(f"[budgets] {done}/{len(scenes)} scenes, {time.time() - start_time:.0f}s", flush=True)
    return {label: data.accuracy_summary(per_type) for label, per_type in hits.items()}


def accuracy_cells(row: dict, full: float, bold: bool = False) -> str:
    """``overall | retained | per-type`` cells of one accuracy row, in percent (retained: share of ``full``)."""
    overall = f"{100 * row['overall']:.1f}"
    retained = f"{100 * row['overall'] / full:.1f} %" if full else "-"
    types = " | ".join(f"{100 * row[t]:.1f}" for t in data.QUESTION_TYPES)
    return f"{f'**{overall}**' if bold else overall} | {retained} | {types}"


def markdown_table(results: dict[str, dict]) -> str:
    """Rows: settings; columns: overall exact match, its share of the all-token accuracy, and per-type exact
    match, in percent."""
    types = list(data.QUESTION_TYPES)
    full = next(row["overall"] for label, row in results.items() if label.startswith("full@"))
    lines = [
        "| setting | tokens | overall | retained | " + " | ".join(types) + " |",
        "|---|---|---|---|" + "---|" * len(types),
    ]
    for label, row in results.items():
        method, tokens = label.split("@")
        lines.append(f"| {method} | {tokens} | {accuracy_cells(row, full, bold=True)} |")
    return "\n".join(lines)


def parse_split_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Add and check the options of a run on the held-out split: --images, --seed, --json."""
    parser.add_argument("--images", type=int, default=data.DEFAULT_TEST_IMAGES, help="test scenes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.images < 1:
        parser.error(f"--images must be >= 1, got {args.images}")
    if args.json is not None:
        from vlmzip.outputs import embedded_model_inputs, refuse_overlap

        try:
            refuse_overlap(args.json, embedded_model_inputs(), "--json")
        except ValueError as exc:
            parser.error(str(exc))
    return args


def report(table: str, results: object, json_path: Path | None) -> int:
    """Print the Markdown `table`; write `results` to `json_path` as well when given. Returns 0 (main's status)."""
    print(table)
    if json_path is not None:
        from vlmzip.outputs import write_json

        write_json(json_path, results)
    return 0


def load_recipe_model():  # noqa: ANN201 - (LlavaForConditionalGeneration, processor)
    """The embedded default model, on at most two threads (the recorded figures' setting)."""
    from vlmzip.default_model import load_default_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    return load_default_model()


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the default model at reduced visual-token budgets on the held-out split."""
    parser = argparse.ArgumentParser(prog="python -m recipes.default_model.budgets", description=main.__doc__)
    args = parse_split_arguments(parser, argv)
    model, processor = load_recipe_model()
    results = evaluate_budgets(model, processor, data.test_split(args.seed, args.images))
    return report(markdown_table(results), results, args.json)


if __name__ == "__main__":
    sys.exit(main())
