"""The one prompt builder every command asks with."""

from __future__ import annotations

import pytest

from conftest import make_llava_processor
from vlmzip.prompts import build_prompt


def test_template_is_used_as_given():
    template = "<image>\nQuestion: {question} Answer:"
    assert build_prompt(None, "how many ?", template=template) == "<image>\nQuestion: how many ? Answer:"
    assert build_prompt(None, "{x}", template="Q: {question} {y}") == "Q: {x} {y}"  # nothing else is formatted


def test_without_chat_template_one_placeholder_line_per_image():
    processor = make_llava_processor()
    assert build_prompt(processor, "how many ?") == "<image>\nhow many ?"
    assert build_prompt(processor, "q", images=2) == "<image>\n<image>\nq"
    assert build_prompt(processor, "q", images=0) == "q"


def test_chat_template_with_images():
    processor = make_llava_processor()
    processor.chat_template = (
        "{% for m in messages %}USER: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
    )
    one, two = build_prompt(processor, "what ?"), build_prompt(processor, "what ?", images=2)
    assert one == "USER: <image>what ? ASSISTANT:" and two == "USER: <image><image>what ? ASSISTANT:"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what ?"}]}]
    assert one == processor.apply_chat_template(messages, add_generation_prompt=True)


def test_bad_arguments():
    with pytest.raises(ValueError, match="images must be an integer >= 0"):
        build_prompt(None, "q", images=-1)
    with pytest.raises(TypeError, match="question must be a string"):
        build_prompt(None, 3)
    with pytest.raises(TypeError, match="template must be a string"):
        build_prompt(None, "q", template=3)
