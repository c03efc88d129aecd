"""vLLM + the VisionZip plugin against transformers + vlmzip on tiny random Qwen2.5-VL and Qwen3-VL (float32).

Needs vLLM (run from `.ci/vllm-tests`); skipped where vLLM is not importable. Every test runs once per
family. The reduced tokens keep their unreduced M-RoPE positions in both implementations, so greedy
tokens must agree exactly; prompts are checked to hold the text plus the reduced count of every image.
The tiny Qwen3-VL adds its two deepstack levels to both language-model layers, so a deepstack feature
that was not reduced with the same selection as the main features (or sat at another token) changes
the greedy tokens.
"""

from __future__ import annotations

import base64
import re
from dataclasses import dataclass

import numpy as np
import pytest

pytest.importorskip("vllm")

from serve_helpers import (  # noqa: E402
    MAX_NEW_TOKENS,
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
from transformers import (  # noqa: E402
    AutoConfig,
    AutoProcessor,
    Qwen2_5_VLForConditionalGeneration,
    Qwen3VLForConditionalGeneration,
)

from vlmzip.config import VisionZipConfig, split_budget  # noqa: E402
from vlmzip.serving.tiny import QWEN_VOCABULARY, build_tiny_qwen2_5_vl, build_tiny_qwen3_vl  # noqa: E402

IMAGE = "<|vision_start|> <|image_pad|> <|vision_end|>"
VIDEO = "<|vision_start|> <|video_pad|> <|vision_end|>"
IMAGE_TOKEN_ID = QWEN_VOCABULARY.index("<|image_pad|>")
VIDEO_TOKEN_ID = QWEN_VOCABULARY.index("<|video_pad|>")
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
VIDEO_PROMPT = f"USER: {VIDEO} what is in the image ? ASSISTANT:"
VIDEO_FRAMES = (4, 112, 168)  # two temporal slices
VIDEO_FPS = 2.0
# Longer than one 32-token KV block with the image's 10 tokens, so that block holds prompt tokens only
# and the follow-up turn can find it (blocks holding generated tokens may not re-tokenize alike).
FIRST_TURN = f"{LONG_QUESTION} how many are there ?"


@dataclass(frozen=True)
class Family:
    name: str  # as the plugin's messages name it
    build: object
    model_class: type
    seed: int
    video_tokens_per_slice: int  # merged tokens of one temporal slice without VisionZip
    # Budgets that must stop the engine at load (each starts one engine); every message is also
    # checked without vLLM.
    startup_budget: dict
    startup_message: str

    def __str__(self) -> str:
        return self.name


FAMILIES = [
    Family(
        "Qwen2.5-VL",
        build_tiny_qwen2_5_vl,
        Qwen2_5_VLForConditionalGeneration,
        seed=1,
        video_tokens_per_slice=24,  # 8 x 12 merged patches
        startup_budget={"retention": 1.5},
        startup_message=r"retention must be a number in \(0, 1\], got 1.5",
    ),
    Family(
        "Qwen3-VL",
        build_tiny_qwen3_vl,
        Qwen3VLForConditionalGeneration,
        seed=3,
        video_tokens_per_slice=20,  # 8 x 10 merged patches (patch 16)
        startup_budget={"retention": 0},
        startup_message=r"retention must be a number in \(0, 1\], got 0",
    ),
]


def bad_budgets(family):
    return [
        ({"retention": 1.5}, r"retention must be a number in \(0, 1\], got 1.5"),
        ({"retention": 0}, r"retention must be a number in \(0, 1\], got 0"),
        ({"retention": 0.5, "dominant": 8}, r"gives both 'retention' and \['dominant'\]"),
        ({"dominant": 0}, r"dominant must be an integer >= 1, got 0"),
        ({"contextual": -1}, r"contextual must be an integer >= 0, got -1"),
        ({"feature_layer": -2}, rf"feature_layer: {re.escape(family.name)}'s visual tokens are the merger output"),
        ({"temporal_threshold": 0.9}, r"temporal_threshold is not supported when serving"),
        ({"tokens": 64}, r"unknown VisionZipConfig fields \['tokens'\]"),
    ]


@pytest.fixture(scope="module", params=FAMILIES, ids=str)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, family):
    root = tmp_path_factory.mktemp(family.name.lower())
    return qwen_workdir(root, family.build, BUDGET, SIZES, VIDEO_FRAMES, seed=family.seed)


@pytest.fixture(scope="module")
def hf_generate(workdir, family):
    """Greedy tokens and reduced prompt length from transformers + vlmzip (the reference)."""

    def generate(config, prompt, images, video=None):
        return reference_generate(family.model_class, workdir / "tiny", config, prompt, images, video)

    return generate


@pytest.fixture(scope="module")
def vllm_results(workdir, family):
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
        {"model": served, "hf_overrides": {"visionzip": family.startup_budget}, "requests": []},
    ]
    return run_vllm(workdir, runs)


def text_tokens(prompt, visuals):
    return len(prompt.split()) - visuals


def test_greedy_tokens_equal_transformers_with_vlmzip(vllm_results, workdir, hf_generate):
    served = vllm_results[0]
    assert "error" not in served, served
    for (prompt, indices), output in zip(REQUESTS, served["outputs"][: len(REQUESTS)], strict=True):
        expected, hf_length = hf_generate(BUDGET, prompt, load_images(workdir, indices))
        assert output["token_ids"] == expected, prompt
        assert len(output["prompt_token_ids"]) == hf_length
        assert hf_length == text_tokens(prompt, len(indices)) + BUDGET.tokens * len(indices)
        assert output["prompt_token_ids"].count(IMAGE_TOKEN_ID) == BUDGET.tokens * len(indices)


def test_unreduced_prompt_is_longer(vllm_results, workdir, hf_generate):
    # Guard against a plugin that silently serves every token.
    prompt = REQUESTS[0][0]
    _, full_length = hf_generate(None, prompt, load_images(workdir, [0]))
    assert full_length == text_tokens(prompt, 1) + merged_tokens(workdir, 0)
    assert len(vllm_results[0]["outputs"][0]["prompt_token_ids"]) < full_length


def test_processor_declares_the_reduced_count(vllm_results):
    assert vllm_results[0]["max_image_tokens"] == BUDGET.tokens
    assert vllm_results[0]["hf_processor_image_tokens"] == BUDGET.tokens


def test_video_slices_are_reduced_as_transformers_with_vlmzip_does(vllm_results, workdir, hf_generate, family):
    output = vllm_results[0]["outputs"][len(REQUESTS)]
    video = (np.load(workdir / "video.npy"), VIDEO_FPS)
    expected, hf_length = hf_generate(BUDGET, VIDEO_PROMPT, [], video)
    slices = VIDEO_FRAMES[0] // 2
    assert output["prompt_token_ids"].count(VIDEO_TOKEN_ID) == slices * BUDGET.tokens
    assert len(output["prompt_token_ids"]) == hf_length
    assert output["token_ids"] == expected
    # Only the video tokens shrink (Qwen3-VL's processor also writes a timestamp before each slice).
    _, full_length = hf_generate(None, VIDEO_PROMPT, [], video)
    assert full_length - hf_length == slices * (family.video_tokens_per_slice - BUDGET.tokens)


def test_prefix_cache_hits_on_a_repeated_image(vllm_results):
    served = vllm_results[0]
    assert served["repeats"][0]["token_ids"] == served["repeats"][1]["token_ids"] == served["outputs"][0]["token_ids"]
    prompt_length = len(served["outputs"][0]["prompt_token_ids"])
    # Each repeat finds the prompt's full 32-token blocks, image included, in the cache.
    assert prompt_length > 32
    assert served["prefix_cache"]["hits"] == 2 * (prompt_length // 32 * 32), served["prefix_cache"]


def test_retention_reduces_each_image_by_its_own_size(vllm_results, workdir, hf_generate):
    run = vllm_results[1]
    assert "error" not in run, run
    prompt = REQUESTS[0][0]
    counts = set()
    for index, output in enumerate(run["outputs"]):
        dominant, contextual = split_budget(max(1, round(0.25 * merged_tokens(workdir, index))))
        config = VisionZipConfig(dominant=dominant, contextual=contextual)
        counts.add(config.tokens)
        expected, hf_length = hf_generate(config, prompt, load_images(workdir, [index]))
        assert output["token_ids"] == expected, index
        assert len(output["prompt_token_ids"]) == hf_length == text_tokens(prompt, 1) + config.tokens
    assert len(counts) > 1  # the images differ in size, and so do their budgets


def test_bad_budget_stops_start_up(vllm_results, family):
    error = vllm_results[2].get("error", "")
    assert re.search(family.startup_message, error), vllm_results[2]


def test_bad_budgets_are_refused_with_a_reason(workdir, family):
    from vlmzip.serving.settings import resolve_budget

    for budget, message in bad_budgets(family):
        hf_config = AutoConfig.from_pretrained(workdir / "served")
        hf_config.visionzip = dict(budget)
        with pytest.raises(ValueError, match=message) as raised:
            resolve_budget(workdir / "served", hf_config)
        assert "\n" not in str(raised.value), budget  # one line


def test_vllm_serve_chat_with_an_image_and_a_follow_up_turn(workdir, hf_generate):
    from openai import OpenAI

    served = workdir / "served"
    port = free_port()
    log = workdir / "serve.log"
    process = start_server(serve_command(served, port, "--enable-prefix-caching", "--block-size", "32"), log, workdir)
    image_url = "data:image/png;base64," + base64.b64encode((workdir / "image0.png").read_bytes()).decode()
    first_turn = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": FIRST_TURN},
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
        second_turn = [
            *first_turn,
            {"role": "assistant", "content": first.choices[0].message.content},
            {"role": "user", "content": "how many are there ?"},
        ]
        second = chat(second_turn)
        hits_after = prometheus_counter(port, "vllm:prefix_cache_hits_total")
    finally:
        stop(process)

    processor = AutoProcessor.from_pretrained(workdir / "tiny")
    units = merged_tokens(workdir, 0)
    for response, conversation in ((first, first_turn), (second, second_turn)):
        hf_conversation = [
            {**m, "content": [{"type": "image"} if p["type"] == "image_url" else p for p in m["content"]]}
            if isinstance(m["content"], list)
            else m
            for m in conversation
        ]
        prompt = processor.apply_chat_template(hf_conversation, add_generation_prompt=True)
        expected, hf_length = hf_generate(BUDGET, prompt, load_images(workdir, [0]))
        assert response.choices[0].model_dump()["token_ids"] == expected
        assert response.usage.prompt_tokens == hf_length == text_tokens(prompt, 1) + BUDGET.tokens
        assert response.usage.prompt_tokens < text_tokens(prompt, 1) + units
    # The follow-up turn shares the first turn's prompt, image included: its blocks come from the cache.
    assert hits_after > hits_before


def test_shrink_video_runs_cuts_each_slice_run_and_keeps_the_rest():
    import torch

    from vlmzip.serving.qwen3 import shrink_video_runs

    v = VIDEO_TOKEN_ID
    grids = torch.tensor([[2, 4, 4], [1, 4, 8]])  # two videos: 2 slices of 4 units, 1 slice of 8
    ids = [5, 1, 56, v, v, v, v, 57, 1, 56, v, v, v, v, 57, 9, 56, *[v] * 8, 57, 6]
    assert shrink_video_runs(ids, v, grids, [2, 3]) == [5, 1, 56, v, v, 57, 1, 56, v, v, 57, 9, 56, v, v, v, 57, 6]
    with pytest.raises(ValueError, match="2 video runs for 3 temporal slices"):
        shrink_video_runs(ids[:15], v, grids, [2, 3])
    with pytest.raises(ValueError, match="more video runs than the 2 temporal slices"):
        shrink_video_runs(ids, v, grids[:1], [2])
