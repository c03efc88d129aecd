"""Checks shared by the family tests: what reaches the language model, batching, remove(); the family builders."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
import torch

import vlmzip
from conftest import IMAGE_TOKEN_ID, random_images
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
from vlmzip.adapters.internvl import image_runs
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


def two_image_turns(placeholder: str = "<image>") -> list[tuple[str, bool]]:
    """A dialogue for run_dialogue (test_conversation.py): an image, a text-only follow-up, a second image."""
    return [
        (f"USER: {placeholder} what is in the image ? ASSISTANT:", True),
        ("USER: how many are there ? ASSISTANT:", False),
        (f"USER: {placeholder} what is left of ? ASSISTANT:", True),
    ]


TWO_IMAGE_TURNS = two_image_turns()
TEXT_ONLY_PROMPT = "USER: how many are there ? ASSISTANT:"


def one_image_prompts(placeholder: str = "<image>") -> list[str]:
    """Three one-image prompts of different lengths (a batch of them is padded)."""
    return [
        f"USER: {placeholder} what is in the image ? ASSISTANT:",
        f"USER: {placeholder} how many are there ? ASSISTANT:",
        f"USER: {placeholder} a big red circle left of a small blue square ? what shape is above ? ASSISTANT:",
    ]


def mixed_prompts(placeholder: str = "<image>") -> list[str]:
    """A batch that mixes samples: one image, text only, two images in one prompt (see mixed_images)."""
    return [
        f"USER: {placeholder} what is in the image ? ASSISTANT:",
        TEXT_ONLY_PROMPT,
        f"USER: {placeholder} what is left of {placeholder} ? ASSISTANT:",
    ]


def mixed_images(images: Sequence) -> list[list]:
    """The images of the mixed_prompts samples: the first image, none, the second and the third."""
    return [[images[0]], [], [images[1], images[2]]]


def two_image_prompt(placeholder: str = "<image>") -> str:
    return f"USER: {placeholder} a cat {placeholder} what is left of ? ASSISTANT:"


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


# The decoding modes a batch must reproduce sample by sample (assert_batch_logits_equal_singles).
GENERATE_MODES = [
    pytest.param({"do_sample": False}, id="greedy"),
    pytest.param({"do_sample": False, "num_beams": 2}, id="beam"),
    pytest.param({"do_sample": True, "top_k": 5}, id="sampling"),
]


def removed_after(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Fixture body: yield `model`, then remove VisionZip from it if the test applied it."""
    yield model
    if vlmzip.is_applied(model):
        vlmzip.remove(model)


def images_of_sizes(sizes: Iterable[tuple[int, int]]) -> list:
    """One random image per (height, width), seeds 0, 1, ..."""
    return [random_images(1, seed=seed, size=size)[0] for seed, size in enumerate(sizes)]


def family_fixtures(
    make_model: Callable[[], torch.nn.Module], make_processor: Callable[[], Any], make_images: Callable[[], list]
) -> tuple[Any, Any, Any]:
    """The fixtures of one family's test module: `processor, images, model = family_fixtures(...)`.

    `processor` and `images` are built once per module; `model` is a fresh one per test, with VisionZip
    removed after it.
    """

    @pytest.fixture(scope="module", name="processor")
    def processor_fixture() -> Any:
        return make_processor()

    @pytest.fixture(scope="module", name="images")
    def images_fixture() -> list:
        return make_images()

    @pytest.fixture(name="model")
    def model_fixture() -> Iterator[torch.nn.Module]:
        yield from removed_after(make_model())

    return processor_fixture, images_fixture, model_fixture


def parametrised_family_fixtures(
    families: dict[str, Callable[[], torch.nn.Module]], make_processor: Callable[[], Any], **config: object
) -> tuple[Any, Any, Any]:
    """The fixtures of a module whose tests run on several families: `family, patched, processor = ...`.

    `family` runs each test once per key of `families` (name -> model builder); `patched` is a fresh model
    of that family with VisionZip applied with `config`; `processor` is built once per module.
    """

    @pytest.fixture(params=list(families), scope="module", name="family")
    def family_fixture(request: pytest.FixtureRequest) -> str:
        return request.param

    @pytest.fixture(name="patched")
    def patched_fixture(family: str) -> torch.nn.Module:
        model = families[family]()
        vlmzip.apply(model, **config)
        return model

    @pytest.fixture(scope="module", name="processor")
    def processor_fixture() -> Any:
        return make_processor()

    return family_fixture, patched_fixture, processor_fixture


def assert_apply_refused(model: torch.nn.Module, error: type[Exception], match: str, **config: object) -> None:
    """apply(model, **config) raises `error` matching `match` and leaves the instance as it was."""
    attributes = set(model.__dict__)
    with pytest.raises(error, match=match):
        vlmzip.apply(model, **config)
    assert model.__dict__.keys() == attributes
    assert not vlmzip.is_applied(model)


def assert_strategy_refused(model: torch.nn.Module, strategy: str) -> None:
    """apply() refuses the model once its vision_feature_select_strategy is `strategy` (a layout the family's
    adapter cannot reduce), and leaves the instance as it was."""
    model.config.vision_feature_select_strategy = strategy
    assert_apply_refused(model, ValueError, f"vision_feature_select_strategy={strategy!r} is not supported")


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


def assert_same_new_tokens(
    raw_output: torch.Tensor, raw_inputs: dict, prepared_output: torch.Tensor, prepared: dict
) -> None:
    """generate() on raw inputs returned the caller's prompt, then the same new tokens as on prepared inputs."""
    prompt = raw_inputs["input_ids"]
    assert torch.equal(raw_output[:, : prompt.shape[1]], prompt)
    assert torch.equal(raw_output[:, prompt.shape[1] :], prepared_output[:, prepared["input_ids"].shape[1] :])


def assert_generate_prepares_raw_inputs(
    model: torch.nn.Module, inputs: dict, max_new_tokens: int = 3, **generate_kwargs: object
) -> None:
    """After apply(), generate() on the processor's `inputs` prepares them itself: it returns the caller's
    prompt, then the tokens that generate() gives the prepared inputs."""
    prepared = vlmzip.prepare(model, inputs)
    with torch.no_grad():
        implicit = model.generate(**inputs, max_new_tokens=max_new_tokens, pad_token_id=0, **generate_kwargs)
        explicit = model.generate(**prepared, max_new_tokens=max_new_tokens, pad_token_id=0, **generate_kwargs)
    assert_same_new_tokens(implicit, inputs, explicit, prepared)


def assert_forward_prepares_raw_inputs(model: torch.nn.Module, inputs: dict, exact: bool = True) -> None:
    """After apply(), a forward on the processor's `inputs` gives the logits of the prepared inputs
    (bit for bit when `exact`, else within float tolerance)."""
    with torch.no_grad():
        raw = model(**inputs).logits
        prepared = model(**vlmzip.prepare(model, inputs)).logits
    if exact:
        assert torch.equal(raw, prepared)
    else:
        torch.testing.assert_close(raw, prepared)


def run_lengths(ids: torch.Tensor | Sequence[int], token_id: int) -> list[int]:
    """Lengths of the runs of `token_id` in one row of token ids, in order."""
    row = torch.as_tensor(ids)[None]
    return image_runs(row, torch.ones_like(row), token_id)


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


def assert_full_budget_gives_the_models_own_features(
    model: torch.nn.Module, inputs: dict, tokens: int, feature_keys: Sequence[str]
) -> None:
    """With `dominant=tokens` (all of them) and no contextual tokens, prepare() hands the language model what
    the model's own get_image_features(*inputs[feature_keys]) gives, bit for bit."""
    vlmzip.apply(model, dominant=tokens, contextual=0)
    with torch.no_grad():
        reduced = vlmzip.prepare(model, inputs)["mm_encoder_outputs"]["image"].pooler_output
        own = model.model.get_image_features(*(inputs[key] for key in feature_keys)).pooler_output
    assert torch.equal(torch.cat(list(reduced)), torch.cat(list(own)))


class FamilyChecks:
    """Checks that every family's test module runs alike, on its own `model`, `processor` and `images` fixtures.

    A module subclasses it as `TestFamilyChecks` and sets the family's builder, budget and inputs; pytest
    then collects these tests in that module. `batch` mixes samples (padding, text-only rows where the
    family allows them); `singles` holds the same samples one by one.
    """

    make_model: Callable[..., torch.nn.Module]
    dominant: int
    contextual: int
    generate_options: dict = {}  # e.g. suppress_tokens, for every generate() of the batch check

    @staticmethod
    def batch(processor: Any, images: list) -> dict:
        raise NotImplementedError

    @staticmethod
    def singles(processor: Any, images: list) -> list[dict]:
        raise NotImplementedError

    @pytest.mark.parametrize("generate_kwargs", GENERATE_MODES)
    def test_batched_generate_equals_per_sample(self, model, processor, images, generate_kwargs):
        vlmzip.apply(model, dominant=self.dominant, contextual=self.contextual)
        torch.manual_seed(0)
        batch, singles = self.batch(processor, images), self.singles(processor, images)
        assert_batch_logits_equal_singles(model, batch, singles, **self.generate_options, **generate_kwargs)

    def test_forward_and_generate_prepare_raw_inputs(self, model, processor, images):
        vlmzip.apply(model, dominant=self.dominant, contextual=self.contextual)
        assert_forward_prepares_raw_inputs(model, self.batch(processor, images))
        assert_generate_prepares_raw_inputs(model, self.batch(processor, images))

    def test_remove_restores_bit_identical_logits(self, processor, images):
        inputs = self.batch(processor, images)
        assert_remove_restores_bit_identical_logits(
            self.make_model, inputs, dominant=self.dominant, contextual=self.contextual
        )
