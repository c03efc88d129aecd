"""vLLM + the VisionZip plugin against transformers + visionzip, on a tiny random LLaVA-1.5 (CLIP 336/14 tower).

Needs vLLM (run from `.ci/vllm-tests` in .venv-vllm); skipped where vLLM is not importable. vLLM runs in
subprocesses: `vllm_runner.py` for the offline engine, `vllm serve` for the OpenAI-compatible server.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("vllm")

from serve_helpers import (  # noqa: E402
    MAX_NEW_TOKENS,
    VLLM_ENV,
    free_port,
    image_paths,
    load_images,
    reference_generate,
    run_vllm,
    stop,
    wait_until_healthy,
)
from transformers import AutoProcessor, LlavaForConditionalGeneration  # noqa: E402

from vlmzip.config import VisionZipConfig  # noqa: E402
from vlmzip.export import export_model  # noqa: E402
from vlmzip.serving.bench_vllm import PROMPT  # noqa: E402
from vlmzip.serving.tiny import build_tiny_llava  # noqa: E402

PROMPT_WORDS = PROMPT.split()  # the benchmark's prompt, one token per word
IMAGE_TOKEN_ID = 4
BUDGET = VisionZipConfig(dominant=54, contextual=10)
REQUESTS = [
    ("USER: <image> what is in the image ? ASSISTANT:", [0]),
    ("USER: <image> how many are there ? ASSISTANT:", [1]),
    ("USER: <image> <image> what is left of the circle ? ASSISTANT:", [2, 0]),
    ("USER: describe a big red circle ASSISTANT:", []),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    # A wide initialiser spreads the logits: greedy decoding has no near-ties between implementations.
    build_tiny_llava(root / "tiny", init_range=0.2)
    export_model(root / "tiny", root / "served", BUDGET)
    rng = np.random.default_rng(0)
    for i in range(3):
        pixels = rng.integers(0, 256, (280 + 40 * i, 360, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"image{i}.png")
    return root


def hf_generate(model_dir, config, prompt, images):
    """Greedy tokens and prompt length from transformers + vlmzip (the reference)."""
    return reference_generate(LlavaForConditionalGeneration, model_dir, config, prompt, images)


@pytest.fixture(scope="module")
def vllm_results(workdir):
    """One vLLM subprocess for every offline check: a served run, then engines that must refuse to start."""
    no_config = workdir / "no_config"
    shutil.copytree(workdir / "served", no_config)
    (no_config / "visionzip_config.json").unlink()
    siglip = workdir / "siglip"
    shutil.copytree(workdir / "served", siglip)
    config = json.loads((siglip / "config.json").read_text())
    config["vision_config"]["model_type"] = "siglip_vision_model"
    (siglip / "config.json").write_text(json.dumps(config))
    next_family = workdir / "llava_next"
    shutil.copytree(workdir / "served", next_family)
    config = json.loads((next_family / "config.json").read_text())
    config["model_type"] = "llava_next"
    (next_family / "config.json").write_text(json.dumps(config))
    served = str(workdir / "served")
    runs = [
        {"model": served, "requests": [{"prompt": p, "images": image_paths(workdir, i)} for p, i in REQUESTS]},
        {"model": served, "hf_overrides": {"visionzip": {"dominant": 570, "contextual": 10}}, "requests": []},
        {"model": str(no_config), "requests": []},
        {"model": str(siglip), "requests": []},
        {"model": str(next_family), "requests": []},
    ]
    return run_vllm(workdir, runs)


def test_greedy_tokens_equal_transformers_with_visionzip(workdir, vllm_results):
    served = vllm_results[0]
    assert "error" not in served, served
    for (prompt, indices), output in zip(REQUESTS, served["outputs"], strict=True):
        images = load_images(workdir, indices)
        expected, hf_prompt_length = hf_generate(workdir / "tiny", BUDGET, prompt, images)
        assert output["token_ids"] == expected, prompt
        # The prompt the language model sees: the text plus dominant + contextual tokens per image.
        text_tokens = len(prompt.split())  # the word-level tokenizer: one token per word, no BOS
        assert len(output["prompt_token_ids"]) == text_tokens - len(indices) + BUDGET.tokens * len(indices)
        assert output["prompt_token_ids"].count(IMAGE_TOKEN_ID) == BUDGET.tokens * len(indices)
        assert len(output["prompt_token_ids"]) == hf_prompt_length


def test_processor_declares_the_reduced_count(vllm_results):
    served = vllm_results[0]
    assert served["max_image_tokens"] == BUDGET.tokens  # what vLLM profiles and budgets the encoder cache for
    assert served["hf_processor_image_tokens"] == BUDGET.tokens  # the HF processor's own expansion agrees


@pytest.mark.parametrize(
    ("run", "message"),
    [
        (1, r"ValueError: dominant \+ contextual must be <= 577 \(the tokens this model's tower yields per image\)"),
        (2, r"no_config: no visionzip_config.json; create the directory with `vlmzip export"),
        (3, r"ValueError: unsupported vision tower 'siglip_vision_model'"),
        (4, r"ValueError: unsupported architecture: model_type 'llava_next'"),
    ],
    ids=["budget-too-large", "missing-config", "unsupported-tower", "unsupported-architecture"],
)
def test_bad_configuration_fails_at_load(vllm_results, run, message):
    # These engines were built with no request at all: the error comes from loading.
    assert "error" in vllm_results[run], vllm_results[run]
    assert re.search(message, vllm_results[run]["error"]), vllm_results[run]["error"]


def test_vllm_serve_answers_an_image_question(workdir):
    from openai import OpenAI

    served = str(workdir / "served")
    override = VisionZipConfig(dominant=20, contextual=4)  # --hf-overrides on top of the exported 54 + 10
    port = free_port()
    log = workdir / "serve.log"
    command = [
        str(Path(sys.executable).with_name("vllm")),
        "serve",
        served,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enforce-eager",
        "--dtype",
        "float32",
        "--max-model-len",
        "1024",
        "--hf-overrides",
        json.dumps({"visionzip": {"dominant": override.dominant, "contextual": override.contextual}}),
    ]
    with log.open("w") as log_file:
        process = subprocess.Popen(command, env=VLLM_ENV, stdout=log_file, stderr=subprocess.STDOUT, cwd=workdir)
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log, timeout=600)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        image_url = "data:image/png;base64," + base64.b64encode((workdir / "image1.png").read_bytes()).decode()
        question = "what is in the image ?"
        response = client.chat.completions.create(
            model=served,
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": question},
                    ],
                }
            ],
            temperature=0,
            max_tokens=MAX_NEW_TOKENS,
            extra_body={"return_token_ids": True},
        )
    finally:
        stop(process)
    assert process.returncode is not None  # stopped by its PID

    processor = AutoProcessor.from_pretrained(workdir / "tiny")
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    image = Image.open(workdir / "image1.png").convert("RGB")
    expected, hf_prompt_length = hf_generate(workdir / "tiny", override, prompt, [image])
    choice = response.choices[0].model_dump()
    assert choice["token_ids"] == expected
    # Word-level tokens are joined with spaces; vLLM's incremental detokenizer also puts one in front.
    assert choice["message"]["content"].strip() == processor.tokenizer.decode(expected, skip_special_tokens=True)
    assert response.usage.prompt_tokens == hf_prompt_length == len(prompt.split()) - 1 + override.tokens


@pytest.mark.slow
def test_benchmark_runs_both_engines(workdir, tmp_path):
    report_path = tmp_path / "bench.json"
    command = [sys.executable, "-m", "vlmzip.cli", "bench-vllm", "--model", str(workdir / "tiny")]
    command += ["--requests", "2", "--max-tokens", "3", "--max-model-len", "1024", "--output", str(report_path)]
    completed = subprocess.run(command, env=VLLM_ENV, capture_output=True, text=True, timeout=1200)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "requests / s" in completed.stdout
    results = json.loads(report_path.read_text())["results"]
    text_tokens = len(PROMPT_WORDS) - 1
    assert results["vllm"]["prompt_tokens_per_request"] == text_tokens + 576
    assert results["vllm+visionzip"]["prompt_tokens_per_request"] == text_tokens + BUDGET.tokens
    assert all(result["requests_per_s"] > 0 for result in results.values())
    assert all(result["completion_tokens_per_request"] == 3 for result in results.values())
    assert all(0 < result["ttft_mean_s"] <= result["batch_s"] for result in results.values())
