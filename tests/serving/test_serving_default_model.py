"""The embedded default model (LLaVA with a DINOv2 tower) exported and served by `vllm serve`, offline on CPU.

The documented recipe end to end: `vlmzip export -o DIR` (no --model: the embedded model), then
`vllm serve DIR` with VLLM_CPU_KVCACHE_SPACE, then the OpenAI client with model=DIR. The answers to
the bundled samples must equal transformers + vlmzip's at the same budget. Needs vLLM (run from
`.ci/vllm-tests`); skipped where vLLM is not importable.
"""

from __future__ import annotations

import base64
import json

import pytest
import torch

pytest.importorskip("vllm")

from serve_helpers import free_port, serve_command, start_server, stop, wait_until_healthy  # noqa: E402

import vlmzip  # noqa: E402
from vlmzip.cli import main as cli_main  # noqa: E402
from vlmzip.config import VisionZipConfig  # noqa: E402
from vlmzip.default_model import load_default_model, sample_inputs  # noqa: E402

BUDGET = VisionZipConfig()  # export's default: 54 + 10
MAX_NEW_TOKENS = 4


def hf_answers(samples):
    model, processor = load_default_model()
    vlmzip.apply(model, BUDGET)
    answers = []
    for sample in samples:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample["question"]}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
        prepared = vlmzip.prepare(model, processor(images=[sample["image"]], text=[prompt], return_tensors="pt"))
        with torch.no_grad():
            out = model.generate(**prepared, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        length = prepared["input_ids"].shape[1]
        answers.append((processor.tokenizer.decode(out[0, length:], skip_special_tokens=True).strip(), length))
    return answers


def test_export_then_vllm_serve_answers_the_bundled_samples(tmp_path, capsys):
    served = tmp_path / "default-vz"
    assert cli_main(["export", "-o", str(served)]) == 0
    assert "VisionZipLlavaForConditionalGeneration, 54 + 10 = 64 tokens per image" in capsys.readouterr().out
    assert json.loads((served / "config.json").read_text())["vision_config"]["model_type"] == "dinov2"

    samples = sample_inputs()
    port = free_port()
    log = tmp_path / "serve.log"
    process = start_server(serve_command(served, port), log, tmp_path)
    responses = []
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log, timeout=600)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        for sample in samples:
            image_url = "data:image/png;base64," + base64.b64encode(sample["image_path"].read_bytes()).decode()
            content = [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": sample["question"]},
            ]
            responses.append(
                client.chat.completions.create(
                    model=str(served),  # the served name is the path given to `vllm serve`
                    messages=[{"role": "user", "content": content}],
                    temperature=0,
                    max_tokens=MAX_NEW_TOKENS,
                )
            )
    finally:
        stop(process)

    expected = hf_answers(samples)
    got = [response.choices[0].message.content.strip() for response in responses]
    assert got == [answer for answer, _ in expected]
    assert [r.usage.prompt_tokens for r in responses] == [length for _, length in expected]
    # 577 DINOv2 tokens per image are 64 in the prompt.
    assert all(r.usage.prompt_tokens < 577 for r in responses)
    # The trained model answers most of the bundled samples correctly at 64 tokens.
    assert sum(answer == sample["answer"] for answer, sample in zip(got, samples, strict=True)) >= len(samples) - 1
