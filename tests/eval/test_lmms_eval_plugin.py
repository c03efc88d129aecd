"""The lmms-eval plugin, offline: entry-point discovery, a local task in lmms-eval's own format, and
the requests answered with VisionZip. Runs where lmms-eval is installed (.ci/eval-plugin); skipped elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval")

from bench.tiny_model import save_tiny_llava  # noqa: E402
from conftest import IMAGE_TOKEN_ID, random_images  # noqa: E402

TASK = "visionzip_tiny_vqa"
QUESTIONS = [("what is in the image ?", "cat"), ("how many are there ?", "two")]

TASK_UTILS = """
from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": float(results[0].strip().lower() in [a.lower() for a in doc["answers"]])}
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Two images, two questions each, as an lmms-eval task reading a local JSON-lines file."""
    folder = tmp_path_factory.mktemp("task")
    rows = []
    for index, image in enumerate(random_images(2, seed=3)):
        path = folder / f"image_{index}.png"
        image.save(path)
        rows += [{"image": str(path), "question": q, "answer": a, "answers": [a]} for q, a in QUESTIONS]
    (folder / "data.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / "utils.py").write_text(TASK_UTILS)
    (folder / f"{TASK}.yaml").write_text(
        textwrap.dedent(f"""\
        task: {TASK}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {folder / "data.jsonl"}
        test_split: test
        output_type: generate_until
        doc_to_visual: !function utils.doc_to_visual
        doc_to_text: !function utils.doc_to_text
        doc_to_target: answer
        generation_kwargs:
          max_new_tokens: 3
          temperature: 0
          do_sample: false
        process_results: !function utils.process_results
        metric_list:
          - metric: exact_match
            aggregation: mean
            higher_is_better: true
        metadata:
          - version: 0.0
        """)
    )
    return folder


def test_entry_point_names_the_model():
    from lmms_eval.models import get_model, list_available_models

    assert "visionzip_llava" in list_available_models()
    assert get_model("visionzip_llava").__name__ == "VisionZipLlava"


def run_lmms_eval(model_args: str, task_dir: Path, output: Path) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_DATASETS_CACHE": str(output / "hf")}
    command = [sys.executable, "-m", "lmms_eval", "--model", "visionzip_llava", "--model_args", model_args]
    command += ["--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "2"]
    command += ["--output_path", str(output), "--log_samples"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = sorted(output.rglob("*results*.json"))
    assert results, f"no results file under {output}: {done.stderr[-2000:]}"
    return json.loads(results[-1].read_text())


def test_lmms_eval_runs_a_local_task_with_visionzip(model_dir, task_dir, tmp_path):
    results = run_lmms_eval(f"pretrained={model_dir},dominant=54,contextual=10", task_dir, tmp_path)
    metrics = results["results"][TASK]
    assert 0.0 <= metrics["exact_match,none"] <= 1.0
    assert results["n-samples"][TASK]["effective"] == 4


def test_requests_are_answered_with_the_budget(model_dir, task_dir):
    """In process: the language model sees 64 tokens per image, and answers match vlmzip.apply + generate."""
    import torch
    from lmms_eval.api.instance import Instance

    import vlmzip
    from vlmzip.integrations.lmms_eval_plugin import VisionZipLlava

    model = VisionZipLlava(pretrained=str(model_dir), dominant=54, contextual=10, batch_size=2)
    docs = [json.loads(line) for line in (task_dir / "data.jsonl").read_text().splitlines()]
    model.task_dict = {TASK: {"test": docs}}
    visual = lambda doc: [random_images(2, seed=3)[docs.index(doc) // 2]]  # noqa: E731

    def request(kind, arguments, doc_id):
        return Instance(kind, arguments, 0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})

    generation = {"max_new_tokens": 3, "until": ["</s>"]}
    requests = [
        request("generate_until", (doc["question"], dict(generation), visual, i, TASK, "test"), i)
        for i, doc in enumerate(docs)
    ]
    seen = []
    handle = model.model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        answers = model.generate_until(requests)
    finally:
        handle.remove()
    assert len(answers) == 4
    assert max(seen) < 64 + 20  # prompts reached the language model with 64 visual tokens, not 576

    processor = model.processor
    for doc, answer in zip(docs, answers, strict=True):
        prompt = model._prompt(doc["question"], 1)
        inputs = vlmzip.prepare(model.model, processor(images=visual(doc), text=[prompt], return_tensors="pt"))
        assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) == 64
        with torch.no_grad():
            out = model.model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
        expected = processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        assert answer == expected.split("</s>")[0].strip()

    scores = model.loglikelihood([request("loglikelihood", (docs[0]["question"], " cat", visual, 0, TASK, "test"), 0)])
    assert len(scores) == 1 and scores[0][0] < 0 and isinstance(scores[0][1], bool)


def test_bad_model_args(model_dir):
    from vlmzip.integrations.lmms_eval_plugin import VisionZipLlava

    with pytest.raises(ValueError, match="unknown arguments"):
        VisionZipLlava(pretrained=str(model_dir), budget=3)
    with pytest.raises(ValueError, match="not both"):
        VisionZipLlava(pretrained=str(model_dir), tokens=64, dominant=54)
    with pytest.raises(ValueError, match="method"):
        VisionZipLlava(pretrained=str(model_dir), method="nope")
