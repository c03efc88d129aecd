"""Questions to evaluate: a local VQA JSONL file or the embedded model's held-out split.

Every item names its image by a key (the file path, or the held-out scene index) so that images
shared by several questions are loaded and encoded once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlmzip.config import check_int

DEFAULT_LIMIT = 500  # held-out questions evaluated by default (about 100 scenes, five question types each)


@dataclass(frozen=True)
class EvalItem:
    image_key: str
    question: str
    answers: tuple[str, ...]
    type: str = "all"


@dataclass
class EvalSet:
    """Items plus a way to get each image; `source` describes where they came from (for resumed runs)."""

    items: list[EvalItem]
    load_image: Callable[[str], Any]
    source: str


def held_out_set(limit: int = DEFAULT_LIMIT, seed: int = 0) -> EvalSet:
    """The first `limit` questions of the embedded model's held-out split (scenes it never trained on)."""
    limit = check_int("limit", limit, 1)
    from vlmzip.default_model.data import iter_split

    items: list[EvalItem] = []
    images: dict[str, Any] = {}
    # The split is generated lazily, scene by scene (up to one question per type each): stop at `limit`.
    for record in iter_split("test", 10**9, seed=seed):
        key = f"held-out:{seed}:{record.scene_index}"
        images[key] = record.image
        items.append(EvalItem(key, record.question, tuple(record.answers), record.type))
        if len(items) == limit:
            break
    return EvalSet(items, images.__getitem__, f"embedded held-out split (seed {seed}, first {limit} questions)")


def jsonl_set(path: str | Path, limit: int | None = None, on_error: str = "stop") -> EvalSet:
    """Questions of a VQA JSONL file (`vlmzip.data` format), optionally the first `limit` of them."""
    from vlmzip.data import load_vqa_jsonl
    from vlmzip.loading import load_image

    records, problems = load_vqa_jsonl(path, on_error=on_error)  # type: ignore[arg-type]
    if limit is not None:
        records = records[: check_int("limit", limit, 1)]
    items = [EvalItem(str(r.image), r.question, r.answers, r.type) for r in records]
    skipped = f", {len(problems)} bad lines skipped" if problems else ""
    source = f"{Path(path).resolve()} ({len(items)} questions{skipped})"
    return EvalSet(items, load_image, source)
