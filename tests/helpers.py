"""Checks shared by the family adapter tests: what reaches the language model, batching, remove()."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import pytest
import torch

import vlmzip
from conftest import IMAGE_TOKEN_ID
from vlmzip.api import STATE_ATTRIBUTE

# A dialogue for run_dialogue (test_conversation.py): an image, a text-only follow-up, a second image.
TWO_IMAGE_TURNS = [
    ("USER: <image> what is in the image ? ASSISTANT:", True),
    ("USER: how many are there ? ASSISTANT:", False),
    ("USER: <image> what is left of ? ASSISTANT:", True),
]


class LanguageModelSpy:
    """Records the `inputs_embeds` of every call into a model's language model; use as a context manager."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls: list[torch.Tensor] = []
        self.handle = model.model.language_model.register_forward_pre_hook(self.record, with_kwargs=True)

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


def _teacher_forced_logits(model: torch.nn.Module, prepared: dict, continuation: torch.Tensor) -> torch.Tensor:
    """Logits (steps, vocab) that predict each token of `continuation` after the one-sample `prepared` prompt."""
    inputs = dict(prepared)
    extra = continuation[:-1].view(1, -1)
    for key, value in prepared.items():
        if isinstance(value, torch.Tensor) and value.shape == prepared["input_ids"].shape:
            fill = extra if key == "input_ids" else torch.full_like(extra, 1 if key == "attention_mask" else 0)
            inputs[key] = torch.cat([value, fill.to(value.dtype)], dim=1)
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    return logits[prepared["input_ids"].shape[1] - 1 :]


def assert_batch_logits_equal_singles(
    model: torch.nn.Module,
    batch: dict,
    singles: Sequence[dict],
    max_new_tokens: int = 4,
    atol: float = 5e-4,
    seed: int = 0,
    **generate_kwargs: object,
) -> None:
    """Each row of a batched generate() has, at every step, the logits its sample gets alone (within `atol`).

    The batch generates (sampling draws from `seed`); each sample alone is then run on its own prompt
    followed by the tokens its row produced, so the comparison holds for sampling too. Greedy rows must
    also equal the sample's own greedy generation token for token. With beam search, each row's best
    sequence and its score must equal the sample's own.
    """

    def run(inputs: dict) -> tuple[int, object]:
        prepared = vlmzip.prepare(model, inputs)
        torch.manual_seed(seed)
        with torch.no_grad():
            output = model.generate(
                **prepared,
                max_new_tokens=max_new_tokens,
                pad_token_id=0,
                return_dict_in_generate=True,
                output_logits=True,
                output_scores=True,
                suppress_tokens=[model.config.image_token_id],  # a generated placeholder is no image slot
                **generate_kwargs,
            )
        return prepared["input_ids"].shape[1], output

    prompt_length, output = run(batch)
    eos = model.config.text_config.eos_token_id
    if int(generate_kwargs.get("num_beams", 1)) > 1:
        for index, single in enumerate(singles):
            alone_length, alone = run(single)
            row = output.sequences[index, prompt_length:].tolist()
            alone_row = alone.sequences[0, alone_length:].tolist()
            cut = (alone_row.index(eos) + 1) if eos in alone_row else len(alone_row)
            assert row[:cut] == alone_row[:cut], f"sample {index} differs in the batch"
            torch.testing.assert_close(output.sequences_scores[index], alone.sequences_scores[0], rtol=0, atol=atol)
        return
    step_logits = torch.stack(output.logits, dim=1)  # (batch, steps, vocab)
    assert len(singles) == output.sequences.shape[0]
    for index, single in enumerate(singles):
        row = output.sequences[index, prompt_length:].tolist()
        row = row[: row.index(eos) + 1] if eos in row else row
        alone = vlmzip.prepare(model, single)
        expected = _teacher_forced_logits(model, alone, torch.tensor(row))
        torch.testing.assert_close(step_logits[index, : len(row)], expected, rtol=0, atol=atol)
        if not generate_kwargs.get("do_sample"):
            suppress = [model.config.image_token_id]
            assert generated_tokens(model, single, max_new_tokens, suppress_tokens=suppress, **generate_kwargs) == [row]
