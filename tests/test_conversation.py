"""Multi-turn dialogue: each image is encoded once, the KV cache is reused, answers equal fresh runs."""

from __future__ import annotations

import pytest
import torch

import vlmzip
from conftest import make_llava, make_llava_processor, qwen_prompt, random_images
from helpers import BUILDERS, language_model, two_image_turns
from vlmzip.conversation import Conversation

LLAVA_TURNS = [
    ("USER: <image> what is in the image ? ASSISTANT:", True),
    ("USER: how many are there ? ASSISTANT:", False),
    ("USER: what shape is left of ? ASSISTANT:", False),
]
QWEN_TURNS = [
    (qwen_prompt("<image>"), True),
    ("USER: how many are there ? ASSISTANT:", False),
    (qwen_prompt("<image>", question="what is left of ?"), True),
]
MAX_NEW_TOKENS = 5


class Counter:
    """Counts calls into the vision tower and records the sequence length of each language model call."""

    def __init__(self, tower, language_model):
        self.tower_calls = 0
        self.lengths: list[int] = []
        self.handles = [
            tower.register_forward_pre_hook(self.count_tower),
            language_model.register_forward_pre_hook(self.record, with_kwargs=True),
        ]

    def count_tower(self, module, args):
        self.tower_calls += 1

    def record(self, module, args, kwargs):
        self.lengths.append(kwargs["inputs_embeds"].shape[1])

    def close(self):
        for handle in self.handles:
            handle.remove()


def fresh_answer(model, processor, text, images, suppress):
    """The answer of a run from scratch: the whole history as one prompt, no cache."""
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    if vlmzip.is_applied(model):
        inputs = vlmzip.prepare(model, inputs)
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0, suppress_tokens=suppress
        )
    return inputs["input_ids"], out[0, inputs["input_ids"].shape[1] :]


def run_dialogue(model, processor, turns, images, tower):
    """Ask every turn and check each answer against a fresh run of the whole history.

    Returns the conversation and how often the vision tower ran during the dialogue (fresh runs excluded).
    """
    chat = Conversation(model, processor)
    counter = Counter(tower, language_model(model))
    history, given, dialogue_tower_calls = "", [], 0
    try:
        for index, (text, with_image) in enumerate(turns):
            turn_images = [images[len(given)]] if with_image else None
            before, calls_before = chat.input_ids.shape[1], counter.tower_calls
            counter.lengths.clear()
            answer = chat.ask(text, images=turn_images, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=0)
            dialogue_tower_calls += counter.tower_calls - calls_before
            turn = chat.turns[-1]
            assert answer == processor.tokenizer.decode(turn.answer_ids, skip_special_tokens=True)
            if index:  # only the previous answer's last token and the new turn reach the language model
                assert counter.lengths[0] == chat.input_ids.shape[1] - turn.answer_ids.numel() - before + 1
            given += turn_images or []
            history += text
            prompt_ids, expected = fresh_answer(model, processor, history, given, chat.suppressed_token_ids)
            assert torch.equal(turn.answer_ids, expected), f"turn {index}: {turn.answer_ids} != fresh {expected}"
            assert torch.equal(chat.input_ids[0], torch.cat([prompt_ids[0], expected]))
            history += " " + processor.tokenizer.decode(turn.answer_ids) + " "
    finally:
        counter.close()
    answers = [tuple(turn.answer_ids.tolist()) for turn in chat.turns]
    assert len(set(answers)) > 1 or len(set(answers[0])) > 1  # the comparison is not vacuous
    return chat, dialogue_tower_calls


def run_two_image_dialogue(model, processor, images, tower, placeholder="<image>"):
    """run_dialogue over two_image_turns(placeholder) with the first two of `images`; each image is encoded
    once, in the turn that brings it. Returns the conversation."""
    chat, tower_calls = run_dialogue(model, processor, two_image_turns(placeholder), images[:2], tower)
    assert tower_calls == 2
    return chat


def test_llava_three_turns_encode_the_image_once():
    model, processor = make_llava(seed=3), make_llava_processor()
    vlmzip.apply(model, dominant=54, contextual=10)
    images = random_images(1)
    chat, tower_calls = run_dialogue(model, processor, LLAVA_TURNS, images, model.model.vision_tower)
    assert tower_calls == 1
    assert int((chat.input_ids == vlmzip.api.get_state(model).adapter.image_token_id).sum()) == 64


@pytest.mark.slow  # the unreduced 576-token image; Qwen covers the path without VisionZip by default
def test_llava_without_visionzip():
    model, processor = make_llava(seed=3), make_llava_processor()
    images = random_images(1)
    chat, tower_calls = run_dialogue(model, processor, LLAVA_TURNS[:2], images, model.model.vision_tower)
    assert tower_calls == 1
    assert int((chat.input_ids == 4).sum()) == 576


QWEN_FAMILIES = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "qwen3.5"]


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_qwen_images_in_several_turns_keep_their_rope_positions(family):
    make_model, make_processor = BUILDERS[family]
    model, processor = make_model(), make_processor()
    vlmzip.apply(model, dominant=8, contextual=4)
    images = random_images(1, seed=3) + random_images(1, seed=4, size=(150, 200))
    chat, tower_calls = run_dialogue(model, processor, QWEN_TURNS, images, model.model.visual)
    assert tower_calls == 2  # once per image, in the turn that brings it
    # The dialogue's positions are those of one prompt holding the whole history.
    history = "".join(turn.text + " " + processor.tokenizer.decode(turn.answer_ids) + " " for turn in chat.turns[:2])
    fresh = vlmzip.prepare(model, processor(text=[history + QWEN_TURNS[2][0]], images=images, return_tensors="pt"))
    length = fresh["input_ids"].shape[1]
    assert torch.equal(chat._positions[..., :length], fresh["position_ids"])


def test_reset_starts_over():
    model, processor = make_llava(seed=3), make_llava_processor()
    vlmzip.apply(model, dominant=20, contextual=4)
    chat = Conversation(model, processor)
    image = random_images(1)
    first = chat.ask(LLAVA_TURNS[0][0], images=image, max_new_tokens=3, pad_token_id=0)
    chat.ask(LLAVA_TURNS[1][0], max_new_tokens=3, pad_token_id=0)
    chat.reset()
    assert chat.turns == [] and chat.input_ids.shape == (1, 0)
    assert chat.ask(LLAVA_TURNS[0][0], images=image[0], max_new_tokens=3, pad_token_id=0) == first


def test_bad_arguments():
    model, processor = make_llava(), make_llava_processor()
    chat = Conversation(model, processor)
    with pytest.raises(TypeError, match="text must be a str"):
        chat.ask(["USER: hi"])
    with pytest.raises(ValueError, match="text must not be empty"):
        chat.ask("  ")
    with pytest.raises(TypeError, match="images must be"):
        chat.ask("USER: <image> ASSISTANT:", images=42)
    with pytest.raises(FileNotFoundError, match="image not found"):
        chat.ask("USER: <image> ASSISTANT:", images="missing-cat.png")
    with pytest.raises(ValueError, match="num_beams must be 1"):
        chat.ask("USER: hi ASSISTANT:", num_beams=2)
    with pytest.raises(ValueError, match=r"\['past_key_values'\] are managed"):
        chat.ask("USER: hi ASSISTANT:", past_key_values=None)
    with pytest.raises(ValueError, match="unsupported model family"):
        Conversation(torch.nn.Linear(2, 2), processor)
    with pytest.raises(TypeError, match="processor"):
        Conversation(model, None)
    assert chat.turns == []


def test_qwen_without_visionzip():
    make_model, make_processor = BUILDERS["qwen2-vl"]
    model, processor = make_model(), make_processor()
    images = random_images(1, seed=3)
    chat, tower_calls = run_dialogue(model, processor, QWEN_TURNS[:2], images, model.model.visual)
    assert tower_calls == 1
    assert int((chat.input_ids == 4).sum()) == 54  # every merged token of the 12x18-patch image
