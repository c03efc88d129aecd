"""The web demo's computation (`vlmzip.app.ask`) and page, without a browser."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import vlmzip
from conftest import make_llava, make_llava_processor, random_images
from vlmzip import app, images
from vlmzip.cli import main

QUESTION = "what is in the image ?"


@pytest.fixture(scope="module")
def tiny():
    return make_llava(), make_llava_processor()


@pytest.fixture(scope="module")
def result(tiny):
    model, processor = tiny
    return app.ask(model, processor, random_images(1)[0], QUESTION, 64, "visionzip", max_new_tokens=2)


def test_ask_reports_answers_tokens_and_timings(result, tiny):
    assert result["question"] == QUESTION and result["method"] == "visionzip"
    assert (result["dominant"], result["contextual"]) == (54, 10)
    assert result["summary"] == "64 of 577 tokens: 54 dominant + 10 contextual"
    # LLaVA's "default" strategy drops [CLS]: 576 placeholders without VisionZip, 64 with it.
    assert result["full"]["visual_tokens"] == 576 and result["reduced"]["visual_tokens"] == 64
    for run in (result["full"], result["reduced"]):
        assert isinstance(run["answer"], str)
        assert run["vision_ms"] > 0 and run["prefill_ms"] > 0
        assert run["first_token_ms"] == pytest.approx(run["vision_ms"] + run["prefill_ms"])
    assert result["speedup"] == pytest.approx(result["full"]["first_token_ms"] / result["reduced"]["first_token_ms"])
    picture = result["visualization"]
    assert isinstance(picture, Image.Image)
    (panel,) = picture.info["visionzip_panels"]
    assert panel["grid"] == (24, 24) and panel["heatmap"] is not None
    assert not vlmzip.is_applied(tiny[0])


def test_the_same_upload_asked_again_comes_from_the_image_cache(tiny):
    from vlmzip.cache import ImageCache

    model, processor, image = tiny[0], tiny[1], random_images(1)[0]
    cache = ImageCache(max_bytes=2**24)
    first = app.ask(model, processor, image, "what is in the image ?", 24, cache=cache, heatmap=False)
    assert first["cached"]["seen_before"] is False
    assert first["cached"]["answer"] == first["reduced"]["answer"]
    second = app.ask(model, processor, image, "how many are there ?", 24, cache=cache, heatmap=False)
    assert second["cached"]["seen_before"] is True and cache.misses == 1
    assert "Asked again" in app.format_stats(second) and "already reduced" in app.format_stats(second)
    assert "cached" not in app.ask(model, processor, image, "how many are there ?", 24, heatmap=False)
    with pytest.raises(TypeError, match="cache"):
        app.ask(model, processor, image, "how many are there ?", 24, cache="yes")


def test_format_stats_shows_the_numbers(result):
    text = app.format_stats(result)
    assert "64 of 577 tokens: 54 dominant + 10 contextual" in text
    assert "| all tokens | 576 |" in text and "| visionzip 54 + 10 | 64 |" in text
    assert f"{result['speedup']:.2f}x time to first token" in text


def test_ask_with_a_split_budget_and_another_method(tiny):
    model, processor = tiny
    image = random_images(1, seed=3)[0]
    out = app.ask(model, processor, image, QUESTION, (20, 4), "pool", heatmap=False, max_new_tokens=1)
    assert out["reduced"]["visual_tokens"] == 24 and out["method"] == "pool"
    assert out["visualization"].info["visionzip_panels"][0]["heatmap"] is None


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"question": "   "}, ValueError, "question must not be empty"),
        ({"question": "a" * 501}, ValueError, "at most 500 characters"),
        ({"question": 3}, TypeError, "question must be a string"),
        ({"budget": 0}, ValueError, "tokens must be an integer >= 1"),
        ({"budget": 9999}, ValueError, "must be <= 576"),
        ({"budget": (1, 2, 3)}, ValueError, "budget must be a token count or"),
        ({"budget": (-1, 2)}, ValueError, "dominant must be an integer >= 1"),
        ({"method": "magic"}, ValueError, "method must be one of"),
        ({"image": "no-such-file.png"}, FileNotFoundError, "image not found"),
        ({"image": 42}, TypeError, "image must be a PIL image"),
        ({"repeats": 0}, ValueError, "repeats"),
    ],
)
def test_ask_input_errors(tiny, kwargs, error, message):
    model, processor = tiny
    arguments = {"image": random_images(1)[0], "question": QUESTION, "budget": 64, "method": "visionzip", **kwargs}
    with pytest.raises(error, match=message):
        app.ask(model, processor, **arguments)


def test_ask_refuses_non_images_and_huge_images(tiny, tmp_path, monkeypatch):
    model, processor = tiny
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="not a readable image"):
        app.ask(model, processor, text, QUESTION)
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ValueError, match="image too large"):
        app.ask(model, processor, Image.new("RGB", (100, 100)), QUESTION)
    monkeypatch.undo()
    # 40,000 pixels, but the processor's shortest-edge resize would make 3,360,000 x 336 of them.
    with pytest.raises(ValueError, match=r"limit 25000000.*aspect ratio"):
        app.ask(model, processor, Image.new("RGB", (20000, 2)), QUESTION)
    with pytest.raises(ValueError, match="unsupported model family"):
        app.ask(torch.nn.Linear(2, 2), processor, Image.new("RGB", (10, 10)), QUESTION)


def test_example_images(tmp_path):
    paths = app.draw_example_images(tmp_path, 3)
    assert [p.name for p in paths] == ["example_1.png", "example_2.png", "example_3.png"]
    assert all(Image.open(p).size == (336, 336) for p in paths)
    pairs = app.default_examples(False, tmp_path / "more")
    assert [q for _, q in pairs] == list(app.FALLBACK_QUESTIONS)


ELEM_IDS = {
    "vz-image",
    "vz-question",
    "vz-mode",
    "vz-tokens",
    "vz-dominant",
    "vz-contextual",
    "vz-method",
    "vz-heatmap",
    "vz-ask",
    "vz-answer-full",
    "vz-answer-reduced",
    "vz-stats",
    "vz-visualization",
}


def test_page_has_stable_element_ids(tiny, tmp_path):
    pytest.importorskip("gradio")
    model, processor = tiny
    examples = app.default_examples(False, tmp_path)
    page = app.build_app(model, processor, examples=examples, repeats=1)
    config = page.get_config_file()
    components = {c["props"].get("elem_id"): c for c in config["components"]}
    assert ELEM_IDS <= set(components)
    assert components["vz-image"]["type"] == "image"  # the upload check keeps the stock frontend
    assert components["vz-tokens"]["props"]["maximum"] == 576  # "default" strategy: no [CLS] placeholder
    choices = [tuple(choice) for choice in components["vz-method"]["props"]["choices"]]
    assert choices == [(m, m) for m in vlmzip.methods.available_methods()]


def test_largest_budget_follows_the_processor_not_the_tower_config(tiny):
    model, processor = tiny
    assert app.tokens_per_image(model, processor) == 576  # "default" strategy: no [CLS] placeholder
    small = make_llava_processor()
    small.image_processor.size = {"shortest_edge": 224}
    small.image_processor.crop_size = {"height": 224, "width": 224}
    assert app.tokens_per_image(model, small) == 16 * 16
    assert app.tokens_per_image(make_llava(strategy="full"), small) == 1 + 16 * 16


def test_page_values_to_budget_and_upload_path():
    assert app.page_budget(app.BUDGET_TOKENS, 128.0, None, None) == 128
    assert app.page_budget(app.BUDGET_SPLIT, 64, 20.0, 4) == (20, 4)
    for bad in ((app.BUDGET_TOKENS, 12.5, 1, 1), (app.BUDGET_SPLIT, 64, None, 4), (app.BUDGET_TOKENS, "x", 1, 1)):
        with pytest.raises(ValueError, match="must be a whole number"):
            app.page_budget(*bad)
    with pytest.raises(ValueError, match="budget mode"):
        app.page_budget("fast", 64, 1, 1)
    assert app.uploaded_path(None) is None
    assert app.uploaded_path({"path": "/tmp/a.png", "orig_name": "a.png"}) == "/tmp/a.png"
    with pytest.raises(ValueError, match="upload the image again"):
        app.uploaded_path({"path": None})


def test_no_stub_files_next_to_the_source(tiny, tmp_path):
    pytest.importorskip("gradio")
    app.build_app(*tiny, examples=(), repeats=1)
    assert not Path(app.__file__).with_suffix(".pyi").exists()


def test_app_command_errors(capsys):
    assert main(["app", "--port", "0", "--model", "/nonexistent"]) == 2
    assert "--port must be an integer in [1, 65535]" in capsys.readouterr().err
    assert main(["app", "--model", "/nonexistent"]) == 2
    assert "model directory not found" in capsys.readouterr().err


def page_function(page, name):
    return next(block.fn for block in page.fns.values() if block.fn.__name__ == name)


def test_errors_name_the_upload_not_server_paths(tiny, tmp_path):
    gr = pytest.importorskip("gradio")
    page = app.build_app(*tiny, examples=(), repeats=1)
    server_copy = tmp_path / "gradio" / "0123abcd" / "notes.png"
    server_copy.parent.mkdir(parents=True)
    server_copy.write_text("not a picture")
    payload = {"path": str(server_copy), "orig_name": "notes.png"}
    for name, arguments in [
        ("check_upload", (payload,)),
        ("on_ask", (payload, QUESTION, app.BUDGET_TOKENS, 64, None, None, "visionzip", False)),
        (
            "on_ask",
            (
                {**payload, "path": str(server_copy.with_name("gone.png"))},
                QUESTION,
                app.BUDGET_TOKENS,
                64,
                None,
                None,
                "visionzip",
                False,
            ),
        ),
    ]:
        with pytest.raises(gr.Error) as raised:
            page_function(page, name)(*arguments)
        message = str(raised.value.message)
        assert "'notes.png'" in message and str(tmp_path) not in message and "/" not in message, message
    assert app.public_message(OSError("cannot open /srv/app/cache/x/y.png"), None, "x") == "cannot open (server file)"
    assert app.public_message(ValueError("tokens/s must be 1/2"), None, "x") == "tokens/s must be 1/2"


def test_uploads_stay_in_a_private_folder_removed_on_exit(tiny, monkeypatch):
    gr = pytest.importorskip("gradio")
    from gradio.utils import get_upload_folder

    seen = {}

    def fake_launch(page, **kwargs):  # what the server would use for uploads, and one upload arriving
        folder = Path(get_upload_folder())
        seen.update(folder=folder, cache=Path(page.GRADIO_CACHE), mode=folder.stat().st_mode & 0o777)
        (folder / "upload.png").write_bytes(b"an upload")

    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    app.launch(*tiny, examples=[], repeats=1)
    assert seen["cache"] == seen["folder"] and seen["folder"].name.startswith("vlmzip-app-")
    assert seen["mode"] == 0o700  # readable by this user only
    assert not seen["folder"].exists()  # removed with every upload in it
    assert "GRADIO_TEMP_DIR" not in os.environ
