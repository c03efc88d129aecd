"""Question-answer pairs as training examples: the prompt, the processor's tokens, labels on the answer only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vlmzip.adapters.base import IGNORE_INDEX


@dataclass(frozen=True)
class Example:
    """One tokenised question-answer pair: the processor's full-length placeholders, no padding."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,) IGNORE_INDEX except the answer tokens and the end-of-sequence token
    image: int  # index into the run's list of images (the cache key)


def build_prompt(processor: Any, question: str, template: str | None = None) -> str:
    """The prompt for one image and one question, ending where the answer starts.

    The same text `vlmzip eval` and `vlmzip demo` ask with: `template` with `{question}` replaced,
    or the processor's chat template.
    """
    if template is not None:
        return template.replace("{question}", question)
    from vlmzip.prompts import build_prompt as chat_prompt

    return chat_prompt(processor, question)


def _answer_tokens(tokenizer: Any, prompt: str, answer: str) -> tuple[int, list[int]]:
    """(prompt tokens to drop from the end, answer token ids incl. end-of-sequence).

    Tokenising prompt and prompt + answer together keeps whatever the tokenizer does at the boundary
    (sentencepiece merges the space into the answer's first piece); the tokens after the common prefix
    are the answer.
    """
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_ids = tokenizer(f"{prompt} {answer}")["input_ids"]
    common = 0
    while common < min(len(prompt_ids), len(full_ids)) and prompt_ids[common] == full_ids[common]:
        common += 1
    answer_ids = list(full_ids[common:])
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the processor's tokenizer has no eos_token_id: the answer needs an end token")
    if not answer_ids or answer_ids[-1] != eos:
        answer_ids.append(eos)
    return len(prompt_ids) - common, answer_ids


def _prompt_ids(processor: Any, image: Any, prompts: Sequence[str]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(pixel_values (1, C, H, W), the processor's token ids of each prompt), processing the image once.

    The processor expands the image token of the first prompt into the image's placeholder run; the
    other prompts get the same run spliced into their text-only tokens. The splice is checked against
    the processor on the first prompt; processors that expand differently get the processor for every
    prompt (the image is processed again each time, which is slower but equal).
    """
    first = processor(images=[image], text=list(prompts[:1]), return_tensors="pt")
    first_ids = first["input_ids"][0]
    token_id = getattr(processor, "image_token_id", None)
    run = int((first_ids == token_id).sum()) if token_id is not None else 0

    def spliced(prompt: str) -> torch.Tensor | None:
        ids = torch.tensor(processor.tokenizer(prompt)["input_ids"], dtype=first_ids.dtype)
        at = (ids == token_id).nonzero().flatten()
        if at.numel() != 1:
            return None
        return torch.cat([ids[: int(at)], ids.new_full((run,), token_id), ids[int(at) + 1 :]])

    if run:
        candidate = spliced(prompts[0])
        rest = [spliced(prompt) for prompt in prompts[1:]]
        if candidate is not None and torch.equal(candidate, first_ids) and all(r is not None for r in rest):
            return first["pixel_values"], [first_ids, *rest]
    ids = [first_ids]
    if len(prompts) > 1:
        others = processor(
            images=[image] * (len(prompts) - 1), text=list(prompts[1:]), return_tensors="pt", padding=True
        )
        ids += [row[mask.bool()] for row, mask in zip(others["input_ids"], others["attention_mask"], strict=True)]
    return first["pixel_values"], ids


def encode_image_examples(
    processor: Any, image: Any, questions: Sequence[tuple[str, str]], prompt_template: str | None = None
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """Tokenise (question, answer) pairs about one image. Returns (pixel_values (1, C, H, W), [(ids, labels)])."""
    prompts = [build_prompt(processor, question, prompt_template) for question, _ in questions]
    pixel_values, prompt_ids = _prompt_ids(processor, image, prompts)
    pairs = []
    for ids, prompt, (_, answer) in zip(prompt_ids, prompts, questions, strict=True):
        drop, answer_ids = _answer_tokens(processor.tokenizer, prompt, answer)
        prompt_part = ids[: ids.numel() - drop]
        answer_part = torch.tensor(answer_ids, dtype=ids.dtype)
        labels = torch.cat([torch.full_like(prompt_part, IGNORE_INDEX), answer_part])
        pairs.append((torch.cat([prompt_part, answer_part]), labels))
    return pixel_values, pairs
