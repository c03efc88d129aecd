"""`vlmzip demo`: measurement on a tiny model and the command's error paths."""

from __future__ import annotations

import mmap

import pytest

import vlmzip
from conftest import make_llava, make_llava_processor, random_images
from vlmzip.cli import main
from vlmzip.demo import render_follow_up, render_table, run_demo
from vlmzip.measure import PeakMemory, current_rss_bytes
from vlmzip.prompts import build_prompt


def test_run_demo_on_tiny_llava():
    model, processor = make_llava(), make_llava_processor()
    config = vlmzip.VisionZipConfig(dominant=20, contextual=4)
    result = run_demo(
        model, processor, random_images(1)[0], "what is in the image ?", config, repeats=1, max_new_tokens=3
    )
    assert result.full.visual_tokens == 576 and result.reduced.visual_tokens == 24
    assert result.full.prefill_ms > 0 and result.reduced.vision_ms > 0
    assert isinstance(result.reduced.answer, str) and result.full.answer
    assert result.reduction.kept_indices.shape == (1, 20)
    assert not vlmzip.is_applied(model)  # the demo never leaves the model patched
    # Both caches hold the same text tokens plus their image tokens: 576 vs 24.
    per_token = (result.full.kv_cache_mb - result.reduced.kv_cache_mb) / (576 - 24)
    text_tokens = result.reduced.kv_cache_mb / per_token - 24
    assert per_token > 0 and text_tokens > 0 and abs(text_tokens - round(text_tokens)) < 1e-6
    assert result.full.kv_cache_mb / per_token - 576 == pytest.approx(text_tokens)
    table = render_table(result, "q")
    assert table.row_count == 7


def test_follow_up_is_answered_from_the_image_cache():
    model, processor = make_llava(), make_llava_processor()
    config = vlmzip.VisionZipConfig(dominant=20, contextual=4)
    image = random_images(1)[0]
    calls = []
    handle = model.model.vision_tower.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        result = run_demo(
            model,
            processor,
            image,
            "what is in the image ?",
            config,
            repeats=1,
            max_new_tokens=3,
            follow_up="how many ?",
        )
        before = len(calls)
        assert result.follow_up is not None and result.follow_up.cache_hits == 1
        again = run_demo(model, processor, image, "what is in the image ?", config, repeats=1, max_new_tokens=3)
    finally:
        handle.remove()
    assert again.follow_up is None and len(calls) > before  # no follow-up: nothing extra
    assert result.follow_up.prefill_ms > 0 and result.follow_up.vision_ms >= 0
    # The follow-up's answer is what the model answers to that question with the same reduction.
    vlmzip.apply(model, config)
    try:
        inputs = vlmzip.prepare(
            model, processor(images=[image], text=[build_prompt(processor, "how many ?")], return_tensors="pt")
        )
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        vlmzip.remove(model)
    expected = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0].strip()
    assert result.follow_up.answer == expected
    assert "from the image cache" in render_follow_up(result)
    with pytest.raises(ValueError, match="follow_up"):
        run_demo(model, processor, image, "q", config, repeats=1, follow_up=" ")


def test_prompt_without_chat_template():
    assert build_prompt(make_llava_processor(), "how many ?") == "<image>\nhow many ?"


def test_peak_memory_sees_an_allocation():
    assert current_rss_bytes() > 0
    size = 64 * 2**20
    with PeakMemory() as memory:
        # A fresh anonymous mapping: its pages become resident only when written, never reused memory.
        block = mmap.mmap(-1, size)
        for offset in range(0, size, mmap.PAGESIZE):
            block[offset] = 1
    block.close()
    assert memory.delta_mb >= 32
    assert memory.peak_mb >= memory.delta_mb


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--image", "/nonexistent.png"], "image not found"),
        (["demo", "--tokens", "64", "--dominant", "3"], "either --tokens or --dominant"),
        (["demo", "--dominant", "0"], "dominant must be an integer >= 1"),
        (["demo", "--question", "  "], "--question must not be empty"),
        (["demo", "--model", "/nonexistent-dir", "--image", "x.png"], "image not found"),
        (["demo", "--method", "nope"], "method must be one of"),
        (["demo", "--follow-up", " "], "--follow-up must not be empty"),
    ],
)
def test_demo_errors_are_one_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_demo_rejects_non_image(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("not an image")
    assert main(["demo", "--image", str(path)]) == 2
    assert "not a readable image" in capsys.readouterr().err


def test_demo_rejects_bad_model_dir(tmp_path, capsys):
    image = tmp_path / "a.png"
    random_images(1)[0].save(image)
    assert main(["demo", "--model", str(tmp_path), "--image", str(image), "--question", "q"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_default_picture_never_replaces_an_existing_file(tmp_path, monkeypatch, capsys):
    from vlmzip.cli import main

    monkeypatch.chdir(tmp_path)
    quick = ["demo", "--no-follow-up", "--repeats", "1", "--max-new-tokens", "2"]
    assert main(quick) == 0
    picture = tmp_path / "vlmzip-demo.png"
    assert picture.stat().st_size > 0 and "kept tokens drawn on the image" in capsys.readouterr().out
    picture.write_bytes(b"the user's own file")
    assert main(quick) == 0
    assert picture.read_bytes() == b"the user's own file"
    assert "vlmzip-demo.png exists" in capsys.readouterr().out
    assert main([*quick, "--overwrite"]) == 0
    assert picture.read_bytes().startswith(b"\x89PNG")
    assert main([*quick, "-o", "mine.png"]) == 0  # an explicit -o is written as given
    assert (tmp_path / "mine.png").read_bytes().startswith(b"\x89PNG")
