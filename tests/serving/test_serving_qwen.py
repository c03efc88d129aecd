"""vLLM + the VisionZip plugin against transformers + vlmzip on a tiny random Qwen2.5-VL (float32).

Needs vLLM (run from `.ci/vllm-tests`); skipped where vLLM is not importable. The reduced tokens keep
their unreduced M-RoPE positions in both, so greedy tokens must agree exactly; prompts are
checked to hold the text plus the reduced count of every image.
"""

from __future__ import annotations

import base64
import re

import numpy as np
import pytest

pytest.importorskip("vllm")

from serve_helpers import (  # noqa: E402
    free_port,
    image_paths,
    load_images,
    merged_tokens,
    prometheus_counter,
    qwen_workdir,
    reference_generate,
    run_vllm,
    serve_command,
    start_server,
    stop,
    wait_until_healthy,
)
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration  # noqa: E402

from vlmzip.config import VisionZipConfig, split_budget  # noqa: E402
from vlmzip.serving.tiny import QWEN_VOCABULARY, build_tiny_qwen2_5_vl  # noqa: E402

MAX_NEW_TOKENS = 8  # vllm_runner.MAX_NEW_TOKENS
IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"
IMAGE_TOKEN_ID = QWEN_VOCABULARY.index("<|image_pad|>")
BUDGET = VisionZipConfig(dominant=8, contextual=2)
# Images of different sizes: Qwen's processor gives each its own grid (within 224x224 pixels).
SIZES = [(300, 400), (200, 150), (160, 420)]
LONG_QUESTION = "describe the big red circle and the small blue square left of the green star"
REQUESTS = [  # the first is longer than a KV block (32 tokens on CPU): its repeats hit the prefix cache
    (f"USER: {IMAGE} what is in the image ? {LONG_QUESTION} ASSISTANT:", [0]),
    (f"USER: {IMAGE} how many are there ? ASSISTANT:", [1]),
    (f"USER: {IMAGE} {IMAGE} what is left of the circle ? ASSISTANT:", [2, 0]),
    ("USER: describe a big red circle ASSISTANT:", []),
]
VIDEO = "<|vision_start|> <|video_pad|> <|vision_end|>"
VIDEO_PROMPT = f"USER: {VIDEO} what is in the image ? ASSISTANT:"
VIDEO_FRAMES = (4, 112, 168)  # two temporal slices of 8 x 12 patches: 24 merged tokens each
VIDEO_FPS = 2.0
VIDEO_TOKEN_ID = QWEN_VOCABULARY.index("<|video_pad|>")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen")
    return qwen_workdir(root, build_tiny_qwen2_5_vl, BUDGET, SIZES, VIDEO_FRAMES, seed=1)


def hf_generate(model_dir, config, prompt, images, video=None):
    """Greedy tokens and reduced prompt length from transformers + vlmzip (the reference)."""
    return reference_generate(Qwen2_5_VLForConditionalGeneration, model_dir, config, prompt, images, video)


def retention_config(units, retention=0.25):
    dominant, contextual = split_budget(max(1, round(retention * units)))
    return VisionZipConfig(dominant=dominant, contextual=contextual)


BAD_BUDGETS = [
    ({"retention": 1.5}, r"retention must be a number in \(0, 1\], got 1.5"),
    ({"retention": 0.5, "dominant": 8}, r"gives both 'retention' and \['dominant'\]"),
    ({"dominant": 0}, r"dominant must be an integer >= 1, got 0"),
    ({"feature_layer": -2}, r"feature_layer: Qwen2.5-VL's visual tokens are the merger output"),
    ({"temporal_threshold": 0.9}, r"temporal_threshold is not supported when serving"),
    ({"tokens": 64}, r"unknown VisionZipConfig fields \['tokens'\]"),
]


@pytest.fixture(scope="module")
def vllm_results(workdir):
    served = str(workdir / "served")
    requests = [{"prompt": p, "images": image_paths(workdir, i)} for p, i in REQUESTS]
    # A video last: its temporal slices are reduced one by one, split over 16-token prefill chunks.
    requests.append({"prompt": VIDEO_PROMPT, "images": [], "video": str(workdir / "video.npy"), "fps": VIDEO_FPS})
    runs = [
        # Chunks of 16 tokens: images are split across prefill steps; the repeats hit the prefix cache.
        {
            "model": served,
            "requests": requests,
            "repeat": 2,
            "image_prompt": f"USER: {IMAGE} what ? ASSISTANT:",
            "llm_options": {
                "enable_prefix_caching": True,
                "enable_chunked_prefill": True,
                "max_num_batched_tokens": 16,
                "block_size": 32,
                "limit_mm_per_prompt": {"image": 2, "video": 1},
            },
        },
        {
            "model": served,
            "hf_overrides": {"visionzip": {"retention": 0.25}},
            "requests": [{"prompt": REQUESTS[0][0], "images": image_paths(workdir, [i])} for i in range(len(SIZES))],
        },
    ]
    # Two engines prove that a bad budget stops vLLM at load; every message is checked without vLLM below.
    runs += [{"model": served, "hf_overrides": {"visionzip": budget}, "requests": []} for budget, _ in BAD_BUDGETS[:2]]
    return run_vllm(workdir, runs)


def expected_length(prompt, indices, per_image):
    return len(prompt.split()) - len(indices) + sum(per_image)


def test_greedy_tokens_equal_transformers_with_vlmzip(workdir, vllm_results):
    served = vllm_results[0]
    assert "error" not in served, served
    for (prompt, indices), output in zip(REQUESTS, served["outputs"][: len(REQUESTS)], strict=True):
        expected, hf_length = hf_generate(workdir / "tiny", BUDGET, prompt, load_images(workdir, indices))
        assert output["token_ids"] == expected, prompt
        assert (
            len(output["prompt_token_ids"])
            == hf_length
            == expected_length(prompt, indices, [BUDGET.tokens] * len(indices))
        )
        assert output["prompt_token_ids"].count(IMAGE_TOKEN_ID) == BUDGET.tokens * len(indices)


def test_video_slices_are_reduced_as_transformers_with_vlmzip_does(workdir, vllm_results):
    output = vllm_results[0]["outputs"][len(REQUESTS)]
    video = (np.load(workdir / "video.npy"), VIDEO_FPS)
    expected, hf_length = hf_generate(workdir / "tiny", BUDGET, VIDEO_PROMPT, [], video)
    slices = VIDEO_FRAMES[0] // 2
    assert output["prompt_token_ids"].count(VIDEO_TOKEN_ID) == slices * BUDGET.tokens
    assert len(output["prompt_token_ids"]) == hf_length == len(VIDEO_PROMPT.split()) - 1 + slices * BUDGET.tokens
    assert output["token_ids"] == expected
    # Without VisionZip the video has 24 merged tokens per slice.
    _, full_length = hf_generate(workdir / "tiny", None, VIDEO_PROMPT, [], video)
    assert full_length == len(VIDEO_PROMPT.split()) - 1 + slices * 24


def test_reduction_changes_the_answer_inputs(workdir, vllm_results):
    # Guard against a plugin that silently serves every token: the unreduced prompt is longer.
    _, full_length = hf_generate(workdir / "tiny", None, REQUESTS[0][0], load_images(workdir, [0]))
    assert full_length == expected_length(REQUESTS[0][0], [0], [merged_tokens(workdir, 0)])
    assert len(vllm_results[0]["outputs"][0]["prompt_token_ids"]) < full_length


def test_prefix_cache_hits_on_a_repeated_image(vllm_results):
    served = vllm_results[0]
    assert served["repeats"][0]["token_ids"] == served["repeats"][1]["token_ids"] == served["outputs"][0]["token_ids"]
    cache = served["prefix_cache"]
    prompt_length = len(served["outputs"][0]["prompt_token_ids"])
    # Each repeat finds the prompt's full 32-token blocks, image included, in the cache.
    assert prompt_length > 32
    assert cache["hits"] == 2 * (prompt_length // 32 * 32), cache


def test_processor_declares_the_reduced_count(vllm_results):
    assert vllm_results[0]["max_image_tokens"] == BUDGET.tokens
    assert vllm_results[0]["hf_processor_image_tokens"] == BUDGET.tokens


def test_retention_reduces_each_image_by_its_own_size(workdir, vllm_results):
    run = vllm_results[1]
    assert "error" not in run, run
    prompt = REQUESTS[0][0]
    counts = set()
    for index, output in enumerate(run["outputs"]):
        units = merged_tokens(workdir, index)
        config = retention_config(units)
        counts.add(config.tokens)
        expected, hf_length = hf_generate(workdir / "tiny", config, prompt, load_images(workdir, [index]))
        assert output["token_ids"] == expected, index
        assert len(output["prompt_token_ids"]) == hf_length == expected_length(prompt, [index], [config.tokens])
    assert len(counts) > 1  # the images differ in size, and so do their budgets


@pytest.mark.parametrize(("run", "message"), [(2 + i, m) for i, (_, m) in enumerate(BAD_BUDGETS[:2])])
def test_bad_budgets_stop_start_up(vllm_results, run, message):
    assert "error" in vllm_results[run], vllm_results[run]
    assert re.search(message, vllm_results[run]["error"]), vllm_results[run]["error"]


@pytest.mark.parametrize(("budget", "message"), BAD_BUDGETS)
def test_bad_budgets_are_refused_with_a_reason(workdir, budget, message):
    from transformers import AutoConfig

    from vlmzip.serving.settings import resolve_budget

    hf_config = AutoConfig.from_pretrained(workdir / "served")
    hf_config.visionzip = dict(budget)
    with pytest.raises(ValueError, match=message):
        resolve_budget(workdir / "served", hf_config)


def test_vllm_serve_multi_turn_chat_with_prefix_cache(workdir):
    from openai import OpenAI

    served = workdir / "served"
    port = free_port()
    log = workdir / "serve.log"
    process = start_server(serve_command(served, port, "--enable-prefix-caching", "--block-size", "32"), log, workdir)
    image_url = "data:image/png;base64," + base64.b64encode((workdir / "image1.png").read_bytes()).decode()
    first_turn = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": LONG_QUESTION},
            ],
        }
    ]
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}/health", log, timeout=600)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")

        def chat(messages):
            return client.chat.completions.create(
                model=str(served),
                messages=messages,
                temperature=0,
                max_tokens=MAX_NEW_TOKENS,
                extra_body={"return_token_ids": True},
            )

        first = chat(first_turn)
        hits_before = prometheus_counter(port, "vllm:prefix_cache_hits_total")
        answer = first.choices[0].message.content
        second_turn = [
            *first_turn,
            {"role": "assistant", "content": answer},
            {"role": "user", "content": "how many are there ?"},
        ]
        second = chat(second_turn)
        hits_after = prometheus_counter(port, "vllm:prefix_cache_hits_total")
    finally:
        stop(process)

    processor = AutoProcessor.from_pretrained(workdir / "tiny")
    image = load_images(workdir, [1])
    units = merged_tokens(workdir, 1)
    for response, conversation in ((first, first_turn), (second, second_turn)):
        hf_conversation = [
            {**m, "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
            if isinstance(m["content"], list)
            else m
            for m in conversation
        ]
        prompt = processor.apply_chat_template(hf_conversation, add_generation_prompt=True)
        expected, hf_length = hf_generate(workdir / "tiny", BUDGET, prompt, image)
        assert response.choices[0].model_dump()["token_ids"] == expected
        assert response.usage.prompt_tokens == hf_length == len(prompt.split()) - 1 + BUDGET.tokens
        assert response.usage.prompt_tokens < len(prompt.split()) - 1 + units
    # The follow-up turn shares the first turn's prompt, image included: its blocks come from the cache.
    assert hits_after > hits_before
