"""Multi-turn dialogue that encodes every image once and reuses the KV cache across turns.

VisionZip's reduction does not depend on the text, so an image's visual tokens are final once the
image is encoded: a later question cannot change them. `Conversation` therefore keeps the token
history and the language model's KV cache (a transformers `Cache`, e.g. `DynamicCache`) between
turns and feeds only what is new: the previous answer's last token and the new turn. The vision
tower runs once per image, in the turn that brings it; an image shown again in a later turn (the
same pixels) is taken from an `ImageCache` (the one given to `vlmzip.apply`, or the
conversation's own) and does not run the tower again.

    chat = vlmzip.Conversation(model, processor)        # after vlmzip.apply(model, ...), or without
    chat.ask("USER: <image> what is in the image ? ASSISTANT:", images=[image], max_new_tokens=32)
    chat.ask("USER: how many are there ? ASSISTANT:", max_new_tokens=32)

Each `text` is one turn in the model's own prompt format (placeholders for the turn's images
included); turns are concatenated as given. Only the first turn gets the tokenizer's special tokens
(e.g. BOS). The answer of every turn equals that of a fresh run of the whole history (greedy
decoding; equal up to floating-point rounding in general).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from vlmzip.adapters import adapter_class_for
from vlmzip.api import get_state, is_applied, prepare
from vlmzip.cache import ImageCache, check_cache
from vlmzip.compat import CACHE_ARGUMENT, CACHE_ARGUMENTS, output_cache
from vlmzip.images import load_image

# Arguments the conversation sets itself on every generate() call.
RESERVED_GENERATE_ARGUMENTS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    *CACHE_ARGUMENTS,
    "return_dict_in_generate",
    "use_cache",
    "mm_encoder_outputs",
)
# Memory of the conversation's own image cache (used when `vlmzip.apply` got none).
DEFAULT_CACHE_BYTES = 256 * 2**20


@dataclass
class Turn:
    """One question and its answer. `answer_ids` are the generated tokens, special tokens included."""

    text: str
    num_images: int
    answer: str
    answer_ids: torch.Tensor


def _check_images(images: object, processor: Any) -> list[Image.Image]:
    """The turn's images as RGB (`vlmzip.load_image`: any mode, EXIF orientation, size limits)."""
    if images is None:
        return []
    if isinstance(images, (Image.Image, str, Path)):
        images = [images]
    if isinstance(images, Sequence) and all(isinstance(i, (Image.Image, str, Path)) for i in images):
        return [load_image(image, processor) for image in images]
    raise TypeError(f"images must be None, a PIL image or path, or a list of them, got {type(images).__name__}")


def _check_generate_arguments(kwargs: dict[str, Any]) -> None:
    reserved = sorted(set(kwargs) & set(RESERVED_GENERATE_ARGUMENTS))
    if reserved:
        raise ValueError(f"generate arguments {reserved} are managed by the conversation; leave them out")
    for name in ("num_beams", "num_return_sequences"):
        if kwargs.get(name, 1) != 1:
            raise ValueError(
                f"{name} must be 1 in a conversation (one answer per turn continues the cache), got {kwargs[name]}"
            )


class Conversation:
    """A dialogue with `model` through `processor`, one sample, history and KV cache kept between turns.

    `model` is any model family vlmzip supports, with or without `vlmzip.apply`; `processor`
    is its processor (anything that takes `text=`, `images=`, `return_tensors=` and has a `tokenizer`).
    `cache`: where images re-shown in later turns are found under VisionZip; None uses the cache
    given to `vlmzip.apply`, else one of the conversation's own (`DEFAULT_CACHE_BYTES`).
    """

    def __init__(self, model: nn.Module, processor: Any, *, cache: ImageCache | None = None) -> None:
        self.family = adapter_class_for(model)  # unsupported models fail here
        self._cache_choice = check_cache(cache)
        self._own_cache: ImageCache | None = None
        if not callable(processor) or getattr(processor, "tokenizer", None) is None:
            raise TypeError(f"processor must be the model's processor (callable, with a tokenizer), got {processor!r}")
        self.model = model
        self.processor = processor
        # M-RoPE models (Qwen2-VL family) need explicit 3-D positions that continue across turns.
        self.reset()

    def reset(self) -> None:
        """Forget the history and the KV cache (images stay in the image cache)."""
        self.turns: list[Turn] = []
        self._ids: torch.Tensor | None = None  # (1, length): the tokens the language model has seen
        self._per_token: dict[str, torch.Tensor] = {}  # other (1, length) inputs, e.g. mm_token_type_ids
        self._positions: torch.Tensor | None = None  # (3, 1, length) M-RoPE positions
        self._cache: Any = None

    @property
    def input_ids(self) -> torch.Tensor:
        """(1, length) every token so far (images as the language model saw them: reduced under VisionZip)."""
        return self._ids if self._ids is not None else torch.zeros(1, 0, dtype=torch.long)

    @property
    def suppressed_token_ids(self) -> list[int]:
        """Image / video placeholder ids: never generated, since the next turn would read them as image slots.

        The model's placeholder ids, and the tokens the processor expands in a prompt (e.g. Gemma 3's
        `<start_of_image>`, InternVL's `<video>`), which a fresh run of the history would expand.
        """
        config = self.model.config
        names = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
        ids = {value for name in names if isinstance(value := getattr(config, name, None), int)}
        tokenizer = self.processor.tokenizer
        for name in ("image_token", "video_token"):
            token = getattr(self.processor, name, None)
            token_id = tokenizer.convert_tokens_to_ids(token) if isinstance(token, str) else None
            if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
                ids.add(token_id)
        return sorted(ids)

    def ask(self, text: str, images: Image.Image | Sequence[Image.Image] | None = None, **generate_kwargs: Any) -> str:
        """Add one turn (its text in the model's prompt format, and its images) and return the answer.

        `generate_kwargs` go to `model.generate` (e.g. `max_new_tokens`, `do_sample`); beam search is
        not available (one answer continues the cache).
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError("text must not be empty")
        image_list = _check_images(images, self.processor)
        _check_generate_arguments(generate_kwargs)

        suppress = sorted(set(generate_kwargs.pop("suppress_tokens", None) or []) | set(self.suppressed_token_ids))
        with torch.no_grad():
            turn_ids, turn_inputs = self._encode_turn(text, image_list)
            model_inputs = self._with_history(turn_ids, turn_inputs)
            output = self.model.generate(
                **model_inputs,
                **{CACHE_ARGUMENT: self._cache},
                use_cache=True,
                return_dict_in_generate=True,
                suppress_tokens=suppress or None,
                **generate_kwargs,
            )
        answer_ids = self._record(model_inputs, output)
        answer = self.processor.tokenizer.decode(answer_ids, skip_special_tokens=True)
        self.turns.append(Turn(text=text, num_images=len(image_list), answer=answer, answer_ids=answer_ids))
        return answer

    def _encode_turn(self, text: str, images: list[Image.Image]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The new turn's token ids and its other inputs, images encoded as the model will receive them."""
        kwargs: dict[str, Any] = {"return_tensors": "pt"}
        if self._ids is not None:
            kwargs["add_special_tokens"] = False  # BOS and the like belong to the start of the dialogue only
        if images:
            kwargs["images"] = images
        inputs = dict(self.processor(text=[text], **kwargs))
        if is_applied(self.model):
            inputs = prepare(self.model, inputs, cache=self.image_cache)  # the tower runs for new images only
        model_positions = (
            None if inputs.get("position_ids") is not None else self.family.model_position_ids(self.model, inputs)
        )
        if model_positions is not None:  # positions the family's model computes itself (M-RoPE)
            inputs["position_ids"] = model_positions
        elif self._original_positions() and inputs.get("position_ids") is None:  # a turn without images
            inputs["position_ids"] = torch.arange(inputs["input_ids"].shape[1]).unsqueeze(0)
        turn_ids = inputs.pop("input_ids")
        inputs.pop("attention_mask", None)
        return turn_ids, inputs

    @property
    def image_cache(self) -> ImageCache | None:
        """The cache this conversation's images go through (None without VisionZip)."""
        if self._cache_choice is not None:
            return self._cache_choice
        state = get_state(self.model)
        if state is None:
            return None
        if state.cache is not None:
            return state.cache
        if self._own_cache is None:
            self._own_cache = ImageCache(max_bytes=DEFAULT_CACHE_BYTES)
        return self._own_cache

    def _original_positions(self) -> bool:
        """Whether turns carry 1-D positions of their own (VisionZip applied with positions="original")."""
        state = get_state(self.model)
        return state is not None and state.config.positions == "original"

    def _with_history(self, turn_ids: torch.Tensor, turn_inputs: dict[str, Any]) -> dict[str, Any]:
        """generate() inputs for the whole dialogue; the cache makes the model run only the uncached tail."""
        history = self.input_ids
        length = history.shape[1]
        model_inputs = dict(turn_inputs)
        model_inputs["input_ids"] = torch.cat([history, turn_ids], dim=1)
        model_inputs["attention_mask"] = torch.ones_like(model_inputs["input_ids"])
        per_token_keys = {k for k, v in turn_inputs.items() if k != "position_ids" and _is_per_token(v, turn_ids)}
        for key in per_token_keys | set(self._per_token):
            before = self._per_token.get(key, torch.zeros(1, length, dtype=torch.long))
            after = turn_inputs.get(key, torch.zeros_like(turn_ids))
            model_inputs[key] = torch.cat([before, after.to(before.dtype)], dim=1)
        if turn_inputs.get("position_ids") is not None:
            # The new turn continues from the largest position so far, as get_rope_index does over a whole prompt
            # (and as the unreduced prompt's 1-D positions do: text after an image continues after all its tokens).
            turn_positions = turn_inputs["position_ids"]
            history_positions = self._positions
            if history_positions is None:  # earlier turns numbered by generate(): 0, 1, ...
                history_positions = torch.arange(length, dtype=turn_positions.dtype)
                history_positions = history_positions.view(*[1] * (turn_positions.dim() - 1), -1)
                history_positions = history_positions.expand(*turn_positions.shape[:-1], -1)
            offset = int(history_positions.max()) + 1 if length else 0
            model_inputs["position_ids"] = torch.cat([history_positions, turn_positions + offset], dim=-1)
        return model_inputs

    def _record(self, model_inputs: dict[str, Any], output: Any) -> torch.Tensor:
        """Keep the history, the per-token inputs and the cache after a turn; return the answer's ids."""
        prompt_length = model_inputs["input_ids"].shape[1]
        sequences = output.sequences
        answer_ids = sequences[0, prompt_length:]
        generated = answer_ids.numel()
        self._ids = sequences
        self._per_token = {
            key: torch.cat([value, value.new_zeros(1, generated)], dim=1)
            for key, value in model_inputs.items()
            if key not in ("input_ids", "attention_mask", "position_ids")
            and _is_per_token(value, sequences[:, :prompt_length])
        }
        positions = model_inputs.get("position_ids")
        if positions is not None:
            # Generated tokens continue every axis by one per token, as generate() extends position_ids.
            steps = torch.arange(1, generated + 1, dtype=positions.dtype).view(*[1] * (positions.dim() - 1), -1)
            self._positions = torch.cat([positions, positions[..., -1:] + steps], dim=-1)
        else:
            self._positions = None
        self._cache = output_cache(output)
        return answer_ids


def _is_per_token(value: object, input_ids: torch.Tensor) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == input_ids.shape


__all__ = ["Conversation", "Turn"]
