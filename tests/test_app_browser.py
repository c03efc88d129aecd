"""`vlmzip app` in a real headless Chromium: upload, ask, read the answers, counts and picture.

Needs Debian's `chromium` and the `playwright` Python package (`.ci/install-browser` installs both;
no browser download). Skipped with the reason when they are missing, except in CI (CI=true), where
a missing browser is a failure. Uses the embedded default model when its weights are present, else
a tiny random LLaVA saved to a temporary directory.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import make_llava, make_llava_processor
from vlmzip import app

CHROMIUM = os.environ.get("VLMZIP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
IN_CI = os.environ.get("CI", "").lower() == "true"
STARTUP_SECONDS = 240
ANSWER_TIMEOUT_MS = 240_000
MAX_NEW_TOKENS = 4


def require(condition: bool, reason: str) -> None:
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{reason}; CI must run the browser test (.ci/install-browser installs what it needs)")
    pytest.skip(reason)


def default_model_available() -> bool:
    try:
        from vlmzip.default_model import files_dir
    except ImportError:
        return False
    return files_dir().is_dir() and any(files_dir().glob("*.safetensors"))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def playwright_api():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "the playwright Python package is not installed")
    require(Path(CHROMIUM).is_file(), f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as api:
        yield api


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(url, model, processor, example image, question) of a running `vlmzip app`; stopped afterwards."""
    work = tmp_path_factory.mktemp("app")
    command = [sys.executable, "-m", "vlmzip.cli", "app", "--repeats", "1", "--max-new-tokens", str(MAX_NEW_TOKENS)]
    if default_model_available():
        from vlmzip.default_model import load_default_model, sample_inputs

        model, processor = load_default_model()
        sample = sample_inputs()[0]
        image, question = Path(sample["image_path"]), sample["question"]
    else:
        model, processor = make_llava(), make_llava_processor()
        model.save_pretrained(work / "model")
        processor.save_pretrained(work / "model")
        command += ["--model", str(work / "model")]
        image, question = app.draw_example_images(work / "examples", 2)[1], app.FALLBACK_QUESTIONS[1]
    port = free_port()
    command += ["--host", "127.0.0.1", "--port", str(port)]
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    log_path = work / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        while True:
            if server.poll() is not None:
                pytest.fail(f"vlmzip app exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(
                    f"vlmzip app did not answer on {url} in {STARTUP_SECONDS} s:\n{log_path.read_text()[-3000:]}"
                )
            time.sleep(1)
        yield url, model, processor, image, question
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.fixture
def page(playwright_api, served):
    browser = playwright_api.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(served[0])
        page.wait_for_selector("#vz-image input[type=file]", state="attached", timeout=60_000)
        yield page
    finally:
        browser.close()


def ask_in_page(page, image: Path, question: str) -> None:
    page.set_input_files("#vz-image input[type=file]", str(image))
    page.wait_for_selector("#vz-image img", timeout=60_000)
    page.fill("#vz-question textarea", question)
    page.click("#vz-ask")


def wait_for_summary(page, summary: str) -> str:
    page.wait_for_function(
        "text => (document.querySelector('#vz-stats')?.innerText || '').includes(text)",
        arg=summary,
        timeout=ANSWER_TIMEOUT_MS,
    )
    page.wait_for_function(
        "() => { const img = document.querySelector('#vz-visualization img');"
        " return img && img.complete && img.naturalWidth > 0; }",
        timeout=60_000,
    )
    return page.inner_text("#vz-stats")


def test_upload_ask_and_see_the_reduction(page, served):
    _, model, processor, image, question = served
    expected = app.ask(model, processor, image, question, 64, max_new_tokens=MAX_NEW_TOKENS)
    ask_in_page(page, image, question)
    stats = wait_for_summary(page, expected["summary"])

    # Greedy decoding on the same weights: the page shows exactly what the library computes.
    assert page.input_value("#vz-answer-full textarea") == (expected["full"]["answer"] or "(empty answer)")
    assert page.input_value("#vz-answer-reduced textarea") == (expected["reduced"]["answer"] or "(empty answer)")
    assert re.search(rf"all tokens\s+{expected['full']['visual_tokens']}\s", stats), stats
    assert re.search(r"visionzip 54 \+ 10\s+64\s", stats), stats
    assert re.search(r"Speedup: [0-9.]+x LLM prefill", stats), stats
    size = page.eval_on_selector("#vz-visualization img", "img => [img.naturalWidth, img.naturalHeight]")
    assert size == list(expected["visualization"].size)

    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app.png"), full_page=True)

    # The other budget control: dominant + contextual.
    page.click("#vz-mode label:has-text('dominant + contextual')")
    page.wait_for_selector("#vz-dominant input", state="visible", timeout=30_000)
    page.fill("#vz-dominant input", "20")
    page.fill("#vz-contextual input", "4")
    page.click("#vz-ask")
    stats = wait_for_summary(page, "24 of 577 tokens: 20 dominant + 4 contextual")
    assert re.search(r"visionzip 20 \+ 4\s+24\s", stats), stats


def test_a_non_image_upload_gets_a_clear_message(page, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("this is not an image")
    page.set_input_files("#vz-image input[type=file]", str(fake))
    toast = page.wait_for_selector("text=not a readable image file", timeout=60_000)
    assert "notes.png" in toast.inner_text()
    assert toast.is_visible()
    assert "Traceback" not in page.inner_text("body")
