"""Regenerate the bundled sample images (``samples/``): one held-out scene per question type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from vlmzip.default_model import data


def write_samples(target: str | Path | None = None, seed: int = 0) -> Path:
    target = Path(target) if target is not None else Path(__file__).resolve().parent / "samples"
    target.mkdir(parents=True, exist_ok=True)
    items = []
    for index, qtype in enumerate(data.QUESTION_TYPES + ("count",)):
        scene = data.generate_scene(seed, "sample", index)
        pool = data.question_pool(scene.objects)[qtype]
        rng = np.random.default_rng([seed, index, 5])
        q = pool[int(rng.integers(len(pool)))]
        name = f"scene_{index}.png"
        scene.image.save(target / name, optimize=True)
        items.append({"image": name, "question": q.question, "answer": q.answer, "type": q.type})
    (target / "samples.json").write_text(json.dumps(items, indent=2) + "\n")
    return target


if __name__ == "__main__":
    print(write_samples())
