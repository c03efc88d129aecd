"""The one prompt builder of the commands: images and a question, ending where the answer starts.

`demo`, `eval`, `finetune`, the web app and the lmms-eval plugin all ask with the same text, so a
measured accuracy, a fine-tuned projector and a demo answer refer to the same prompt.
"""

from __future__ import annotations

from typing import Any

from vlmzip._validation import check_int

QUESTION_FIELD = "{question}"


def build_prompt(processor: Any, question: str, images: int = 1, template: str | None = None) -> str:
    """The prompt for `images` images and `question`.

    template: a text with `{question}` in it (replaced by the question; nothing else is formatted), used
        as given: it holds its own image placeholders. Without one, the processor's chat template
        around `images` images and the question; without a chat template, one image placeholder line
        per image before the question (`<image>\\nquestion`).
    """
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    images = check_int("images", images, 0)
    if template is not None:
        if not isinstance(template, str):
            raise TypeError(f"template must be a string or None, got {type(template).__name__}")
        return template.replace(QUESTION_FIELD, question)
    if getattr(processor, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    image_token = getattr(processor, "image_token", None) or "<image>"
    return f"{image_token}\n" * images + question
