"""A small VQA JSONL file in the shared format, with random images, for the eval tests."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import random_images

QUESTIONS = [
    ("what is in the image ?", ["cat"], "what"),
    ("how many are there ?", ["two"], "count"),
    ("what shape is above ?", ["circle", "square"], "what"),
]


def write_vqa(folder: Path, images: int = 3) -> Path:
    """`images` random pictures, every question asked about each of them (so images repeat across lines)."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for index, image in enumerate(random_images(images, seed=11)):
        name = f"image_{index}.png"
        image.save(folder / name)
        for question, answers, kind in QUESTIONS:
            lines.append(json.dumps({"image": name, "question": question, "answers": answers, "type": kind}))
    path = folder / "vqa.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path
