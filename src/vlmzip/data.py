"""The VQA JSONL format shared by `vlmzip eval` and `vlmzip finetune`.

One JSON object per line:
    {"image": "images/0001.png", "question": "How many circles are there?", "answers": ["3"], "type": "count"}
`image` is a path, relative paths being resolved against the JSONL file's folder; `answers` is a
non-empty list of accepted answers (a single string is accepted as `"answer"` too); `type` is
optional and groups results by question type. Blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

OnError = Literal["stop", "skip"]


@dataclass(frozen=True)
class VQARecord:
    image: Path
    question: str
    answers: tuple[str, ...]
    type: str = "all"
    line: int = 0


class DataError(ValueError):
    """A JSONL file that cannot be used; the message names the file and line."""


def _parse_line(text: str, line: int, base: Path, path: Path) -> VQARecord:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{line}: not valid JSON ({error.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}:{line}: expected a JSON object, got {type(obj).__name__}")
    image, question = obj.get("image"), obj.get("question")
    answers = obj.get("answers", [obj["answer"]] if "answer" in obj else None)
    if not isinstance(image, str) or not image:
        raise DataError(f"{path}:{line}: 'image' must be a non-empty path string")
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{path}:{line}: 'question' must be a non-empty string")
    if isinstance(answers, str):
        answers = [answers]
    if not isinstance(answers, list) or not answers or not all(isinstance(a, (str, int, float)) for a in answers):
        raise DataError(f"{path}:{line}: 'answers' must be a non-empty list of strings")
    kind = obj.get("type", "all")
    image_path = Path(image)
    if not image_path.is_absolute():
        image_path = base / image_path
    return VQARecord(image_path, question.strip(), tuple(str(a) for a in answers), str(kind), line)


def load_vqa_jsonl(
    path: str | Path, *, on_error: OnError = "stop", check_images: bool = True
) -> tuple[list[VQARecord], list[str]]:
    """Read a VQA JSONL file. Returns (records, problems).

    With on_error="stop" the first bad line raises DataError naming the line; with "skip" bad lines
    are left out and described in `problems`. Missing image files count as bad lines when
    `check_images` is set.
    """
    if on_error not in ("stop", "skip"):
        raise ValueError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    records: list[VQARecord] = []
    problems: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            text = text.strip()
            if not text or text.startswith("#"):
                continue
            try:
                record = _parse_line(text, line, path.parent, path)
                if check_images and not record.image.is_file():
                    raise DataError(f"{path}:{line}: image not found: {record.image}")
            except DataError as error:
                if on_error == "stop":
                    raise
                problems.append(str(error))
                continue
            records.append(record)
    if not records:
        raise DataError(f"{path}: no usable records" + (f" ({len(problems)} bad lines)" if problems else ""))
    return records, problems


def normalize_answer(text: str) -> str:
    """Exact-match normalisation: case, surrounding spaces and a trailing full stop are ignored."""
    return text.strip().lower().rstrip(".").strip()


def is_correct(prediction: str, answers: tuple[str, ...] | list[str]) -> bool:
    return normalize_answer(prediction) in {normalize_answer(a) for a in answers}
