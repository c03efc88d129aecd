"""A tiny LLaVA saved as a local model directory, for the command-line tests of bench and eval."""

from __future__ import annotations

from pathlib import Path

from conftest import make_llava, make_llava_processor


def save_tiny_llava(path: Path) -> Path:
    model = make_llava()
    model.generation_config.pad_token_id = 0
    model.save_pretrained(path)
    make_llava_processor().save_pretrained(path)
    return path
