"""The new pre-LLM baselines through the LLaVA adapter: exactly the budget reaches the language model."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import IMAGE_TOKEN_ID

PROMPTS = ["USER: <image> what is in the image ? ASSISTANT:", "USER: <image> how many are there ? ASSISTANT:"]


@pytest.mark.parametrize("method", ["divprune", "tome"])
def test_budget_reaches_language_model(fresh_llava, llava_processor, images, method):
    vlmzip.apply(fresh_llava, dominant=54, contextual=10, method=method)
    try:
        inputs = llava_processor(images=images[:2], text=PROMPTS, return_tensors="pt", padding=True)
        prepared = vlmzip.prepare(fresh_llava, inputs)
        assert (prepared["input_ids"] == IMAGE_TOKEN_ID).sum(dim=1).tolist() == [64, 64]
        assert [f.shape[0] for f in prepared["mm_encoder_outputs"]["image"].pooler_output] == [64, 64]
        with torch.no_grad():
            out = fresh_llava.generate(**prepared, max_new_tokens=3, pad_token_id=0)
        assert out.shape[1] == prepared["input_ids"].shape[1] + 3
    finally:
        vlmzip.remove(fresh_llava)
