"""The shared VQA JSONL format."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmzip.data import DataError, is_correct, load_vqa_jsonl


@pytest.fixture
def dataset(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    lines = [
        json.dumps({"image": "a.png", "question": "How many?", "answers": ["3"], "type": "count"}),
        "",
        "# a comment",
        json.dumps({"image": "a.png", "question": "Shape?", "answer": "circle"}),
        "{not json",
        json.dumps({"image": "missing.png", "question": "Q?", "answers": ["x"]}),
        json.dumps({"image": "a.png", "question": "", "answers": ["x"]}),
        json.dumps({"image": "a.png", "question": "Q?", "answers": []}),
    ]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_skip_reports_line_numbers(dataset):
    records, problems = load_vqa_jsonl(dataset, on_error="skip")
    assert [r.question for r in records] == ["How many?", "Shape?"]
    assert records[0].type == "count" and records[1].answers == ("circle",)
    assert records[0].image == dataset.parent / "a.png"
    assert [p.split(":")[1] for p in problems] == ["5", "6", "7", "8"]
    assert "not valid JSON" in problems[0] and "image not found" in problems[1]


def test_stop_raises_at_first_bad_line(dataset):
    with pytest.raises(DataError, match=r"data.jsonl:5: not valid JSON"):
        load_vqa_jsonl(dataset)


def test_missing_file_and_bad_option(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vqa_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="on_error"):
        load_vqa_jsonl(tmp_path / "nope.jsonl", on_error="ignore")


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no usable records"):
        load_vqa_jsonl(path)


def test_exact_match():
    assert is_correct(" Circle. ", ["circle"])
    assert not is_correct("circles", ["circle"])
