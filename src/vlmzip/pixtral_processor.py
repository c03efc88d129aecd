"""A Pixtral / Mistral 3 processor that needs no torchvision.

transformers' `PixtralProcessor` (the processor of `Mistral3ForConditionalGeneration`) is a placeholder
without torchvision, and its module imports the torchvision image processor, so it cannot even be
imported there. `PixtralPilProcessor` is the same processor built on `PixtralImageProcessorPil`: it
resizes images to multiples of `patch_size * spatial_merge_size`, and writes each `[IMG]` of the text
as rows of `[IMG]` tokens separated by `[IMG_BREAK]`, the last row ending in `[IMG_END]`, exactly as
`PixtralProcessor` does. It saves as a `PixtralProcessor` (so a saved directory loads with
`AutoProcessor` wherever torchvision is installed) and loads from any Mistral 3 model directory:

    from vlmzip.pixtral_processor import PixtralPilProcessor
    processor = PixtralPilProcessor.from_pretrained(model_dir)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil
from transformers.processing_utils import ProcessorMixin

SAVED_CLASS = "PixtralProcessor"


class PixtralPilProcessor(ProcessorMixin):
    """`PixtralProcessor` on the PIL image processor (see the module docstring)."""

    def __init__(
        self,
        image_processor: PixtralImageProcessorPil | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        patch_size: int = 16,
        spatial_merge_size: int = 1,
        chat_template: str | None = None,
        image_token: str = "[IMG]",
        image_break_token: str = "[IMG_BREAK]",
        image_end_token: str = "[IMG_END]",
        **kwargs: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, chat_template=chat_template)
        self.patch_size = int(patch_size)
        self.spatial_merge_size = int(spatial_merge_size)
        self.image_token = image_token
        self.image_break_token = image_break_token
        self.image_end_token = image_end_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.image_break_token_id = tokenizer.convert_tokens_to_ids(image_break_token)
        self.image_end_token_id = tokenizer.convert_tokens_to_ids(image_end_token)

    @property
    def image_token_ids(self) -> list[int]:
        return [self.image_token_id, self.image_break_token_id, self.image_end_token_id]

    def check_argument_for_proper_class(self, argument_name: str, argument: object) -> type:
        if argument_name == "image_processor" and not isinstance(argument, PixtralImageProcessorPil):
            raise TypeError(f"image_processor must be a PixtralImageProcessorPil, got {type(argument).__name__}")
        return super().check_argument_for_proper_class(argument_name, argument)

    def _process_images(self, images: Any, **images_kwargs: Any) -> Any:
        images_kwargs["patch_size"] = self.patch_size * self.spatial_merge_size
        return super()._process_images(images, **images_kwargs)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        step = self.patch_size * self.spatial_merge_size
        height, width = (int(value) for value in image_inputs["image_sizes"][image_idx])
        row = [self.image_token] * (width // step) + [self.image_break_token]
        tokens = row * (height // step)
        tokens[-1] = self.image_end_token
        return "".join(tokens)

    @property
    def model_input_names(self) -> list[str]:
        return [*self.tokenizer.model_input_names, *self.image_processor.model_input_names, "image_sizes"]

    def to_dict(self) -> dict[str, Any]:
        output = super().to_dict()
        output["processor_class"] = SAVED_CLASS
        return output

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | Path, **kwargs: Any) -> PixtralPilProcessor:
        """Load from a model directory; its image processor is built as the PIL one whatever its config names."""
        from transformers import AutoTokenizer

        path = Path(pretrained_model_name_or_path)
        settings: dict[str, Any] = {}
        for name in ("processor_config.json", "preprocessor_config.json"):
            if (path / name).is_file():
                settings = {**json.loads((path / name).read_text(encoding="utf-8")), **settings}
        image_settings = settings.pop("image_processor", None) or {
            key: value
            for key, value in settings.items()
            if key in PixtralImageProcessorPil.valid_kwargs.__annotations__
        }
        image_settings = {
            key: value
            for key, value in image_settings.items()
            if not key.startswith("_") and key != "image_processor_type"
        }
        image_processor = PixtralImageProcessorPil(**image_settings)
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        own = {
            key: settings[key]
            for key in ("patch_size", "spatial_merge_size", "image_token", "image_break_token", "image_end_token")
            if key in settings
        }
        return cls(image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template, **own)


__all__ = ["PixtralPilProcessor"]
