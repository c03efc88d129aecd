"""Checks shared by the family tests: what reaches the language model, batching, remove(); the family builders."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import torch

import vlmzip
from conftest import IMAGE_TOKEN_ID
from families import (
    FAMILIES,
    make_gemma3,
    make_gemma3_processor,
    make_internvl,
    make_internvl_processor,
    make_mistral3,
    make_mistral3_processor,
    make_qwen3_5,
    make_qwen3_processor,
    make_qwen3_vl,
    make_qwen3_vl_moe,
    make_smolvlm,
    make_smolvlm_processor,
)
from vlmzip.api import STATE_ATTRIBUTE

# Every supported family's tiny model: family -> (model builder, processor builder); families.FAMILIES first.
BUILDERS: dict[str, tuple[Callable[..., torch.nn.Module], Callable[..., Any]]] = {
    **{name: (family.make_model, family.make_processor) for name, family in FAMILIES.items()},
    "qwen3-vl": (make_qwen3_vl, make_qwen3_processor),
    "qwen3-vl-moe": (make_qwen3_vl_moe, make_qwen3_processor),
    "qwen3.5": (make_qwen3_5, make_qwen3_processor),
    "gemma3": (make_gemma3, make_gemma3_processor),
    "internvl": (make_internvl, make_internvl_processor),
    "smolvlm": (make_smolvlm, make_smolvlm_processor),
    "mistral3": (make_mistral3, make_mistral3_processor),
}

# A dialogue for run_dialogue (test_conversation.py): an image, a text-only follow-up, a second image.
TWO_IMAGE_TURNS = [
    ("USER: <image> what is in the image ? ASSISTANT:", True),
    ("USER: how many are there ? ASSISTANT:", False),
    ("USER: <image> what is left of ? ASSISTANT:", True),
]


def language_model(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder inside a VLM (`language_model`, or SmolVLM's `text_model`)."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


class LanguageModelSpy:
    """Records the `inputs_embeds` of every call into a model's language model; use as a context manager."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = language_model(model).register_forward_pre_hook(self.record, with_kwargs=True)

    def record(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append(kwargs["inputs_embeds"].detach().clone())

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """(batch, sequence length, width) of each call."""
        return [tuple(call.shape) for call in self.calls]

    def close(self) -> None:
        self.handle.remove()

    def __enter__(self) -> LanguageModelSpy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def removed_after(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Fixture body: yield `model`, then remove VisionZip from it if the test applied it."""
    yield model
    if vlmzip.is_applied(model):
        vlmzip.remove(model)


def assert_apply_refused(model: torch.nn.Module, error: type[Exception], match: str, **config: object) -> None:
    """apply(model, **config) raises `error` matching `match` and leaves the instance as it was."""
    attributes = set(model.__dict__)
    with pytest.raises(error, match=match):
        vlmzip.apply(model, **config)
    assert model.__dict__.keys() == attributes
    assert not vlmzip.is_applied(model)


def visual_tokens_reaching_llm(model: torch.nn.Module, prepared: dict, token_id: int = IMAGE_TOKEN_ID) -> torch.Tensor:
    """Run one forward on `prepared` and return the embeddings the language model got at `token_id` positions.

    Also checks that nothing but the prepared sequence reached it (same length, one call).
    """
    with LanguageModelSpy(model) as spy, torch.no_grad():
        model(**prepared)
    assert len(spy.calls) == 1
    embeds = spy.calls[0]
    assert embeds.shape[:2] == prepared["input_ids"].shape
    return embeds[prepared["input_ids"] == token_id]


def generated_tokens(
    model: torch.nn.Module, inputs: dict, max_new_tokens: int = 5, **kwargs: object
) -> list[list[int]]:
    """Prepare `inputs`, generate, and return each row's new tokens up to its first end-of-sequence.

    Rows of a batch are padded after they finish, so only the tokens up to EOS are comparable.
    """
    prepared = vlmzip.prepare(model, inputs)
    prompt_length = prepared["input_ids"].shape[1]
    with torch.no_grad():
        output = model.generate(**prepared, max_new_tokens=max_new_tokens, pad_token_id=0, **kwargs)
    eos = model.config.text_config.eos_token_id
    rows = []
    for row in output[:, prompt_length:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def assert_batch_equals_singles(
    model: torch.nn.Module, batch: dict, singles: Sequence[dict], max_new_tokens: int = 5, **generate_kwargs: object
) -> None:
    """Each sample of `batch` generates what it generates alone (`singles[i]` holds sample i's inputs)."""
    batched = generated_tokens(model, batch, max_new_tokens, **generate_kwargs)
    assert len(batched) == len(singles)
    for index, single in enumerate(singles):
        alone = generated_tokens(model, single, max_new_tokens, **generate_kwargs)
        assert alone == [batched[index]], f"sample {index} differs in the batch"


def _generate_with_logits(model: torch.nn.Module, inputs: dict, max_new_tokens: int, **kwargs: object):
    prepared = vlmzip.prepare(model, inputs)
    with torch.no_grad():
        output = model.generate(
            **prepared,
            max_new_tokens=max_new_tokens,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
            **kwargs,
        )
    return prepared["input_ids"].shape[1], output


def assert_batch_logits_equal_singles(
    model: torch.nn.Module,
    batch: dict,
    singles: Sequence[dict],
    max_new_tokens: int = 4,
    atol: float = 5e-4,
    **generate_kwargs: object,
) -> None:
    """Each sample of `batch` gets, at every generation step, the tokens and logits it gets alone.

    Greedy and beam search: the run alone is compared step by step (every beam of the sample) until
    the sample's first end-of-sequence. Sampling (`do_sample=True`): the batch's sampled path is
    replayed alone in one forward pass and its logits compared with the batch's at every step.
    """
    beams = int(generate_kwargs.get("num_beams", 1))
    prompt, batched = _generate_with_logits(model, batch, max_new_tokens, **generate_kwargs)
    eos = model.config.text_config.eos_token_id
    assert batched.sequences.shape[0] == len(singles)
    for index, single in enumerate(singles):
        new = batched.sequences[index, prompt:].tolist()
        steps = new.index(eos) + 1 if eos in new else len(new)
        rows = slice(index * beams, (index + 1) * beams)
        if generate_kwargs.get("do_sample"):
            prepared = vlmzip.prepare(model, single)
            path = torch.tensor([new[: steps - 1]], dtype=prepared["input_ids"].dtype)
            extended = dict(prepared)
            for key, value in prepared.items():  # per-token inputs (e.g. Gemma 3's token_type_ids) grow too
                if isinstance(value, torch.Tensor) and value.shape == prepared["input_ids"].shape:
                    fill = path if key == "input_ids" else torch.zeros_like(path)
                    extended[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
            extended["attention_mask"] = torch.ones_like(extended["input_ids"])
            with torch.no_grad():
                alone = model(**extended).logits[0, prepared["input_ids"].shape[1] - 1 :]
            for step in range(steps):
                torch.testing.assert_close(batched.logits[step][index], alone[step], atol=atol, rtol=0)
            continue
        alone_prompt, alone = _generate_with_logits(model, single, max_new_tokens, **generate_kwargs)
        assert alone.sequences[0, alone_prompt:].tolist()[:steps] == new[:steps], f"sample {index} differs"
        for step in range(steps):
            difference = (batched.logits[step][rows] - alone.logits[step][:beams]).abs().max()
            assert difference <= atol, f"sample {index}, step {step}: logits differ by {difference}"


def assert_remove_restores_bit_identical_logits(
    build_model: Callable[[], torch.nn.Module], inputs: dict, **config: object
) -> None:
    """apply(**config) shortens the sequence; remove() gives back the never-patched logits bit for bit.

    Two models from `build_model` (same weights): one is patched, the other never is and must stay
    unaffected while the first is (the class is not touched). After remove() the instance holds none
    of VisionZip's attributes.
    """
    never_patched, model = build_model(), build_model()
    with torch.no_grad():
        expected = never_patched(**inputs).logits
        vlmzip.apply(model, **config)
        reduced = model(**inputs).logits
        assert torch.equal(never_patched(**inputs).logits, expected)
        vlmzip.remove(model)
        restored = model(**inputs).logits
    assert reduced.shape[1] < expected.shape[1]
    assert torch.equal(restored, expected)
    assert not {"forward", "generate", STATE_ATTRIBUTE} & model.__dict__.keys()


# What Qwen's get_rope_index reads besides input_ids, where the inputs hold it.
_ROPE_INPUTS = ("mm_token_type_ids", "image_grid_thw", "video_grid_thw", "second_per_grid_ts", "attention_mask")


def original_rope_positions(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The 3-D M-RoPE positions (3, batch, sequence) that a Qwen model gives the unreduced `inputs`."""
    extra = {key: inputs[key] for key in _ROPE_INPUTS if key in inputs}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], **extra)
    return positions


def reference_visionzip(
    features: torch.Tensor, scores: Sequence[float], keys: Sequence[torch.Tensor], dominant: int, contextual: int
) -> torch.Tensor:
    """The published selection and merge, written out with plain loops over the tokens of one image.

    features (tokens, hidden), one score and one key per token (no [CLS]). Dominant: the `dominant`
    best-scored tokens, in index order. Contextual: evenly spaced targets among the rest; every other
    remaining token joins the target of highest cosine similarity (first wins ties); target + mean.
    """
    order = sorted(range(len(scores)), key=lambda token: -scores[token])
    kept = sorted(order[:dominant])
    remaining = [token for token in range(len(scores)) if token not in kept]
    step = max(1, len(remaining) // contextual) if contextual else 1
    targets = remaining[::step][:contextual]
    members: dict[int, list[int]] = {target: [] for target in targets}
    for token in remaining:
        if token in members:
            continue
        similarities = [float(torch.nn.functional.cosine_similarity(keys[token], keys[t], dim=0)) for t in targets]
        members[targets[similarities.index(max(similarities))]].append(token)
    tokens = [features[token] for token in kept]
    for target in targets:
        extra = torch.stack([features[m] for m in members[target]]).mean(dim=0) if members[target] else 0
        tokens.append(features[target] + extra)
    return torch.stack(tokens)
