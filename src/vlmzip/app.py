"""A local web demo: ask a question about an image with all visual tokens and with VisionZip.

`ask(model, processor, image, question, budget, method)` is the whole computation as a plain
function (answers, visual token counts, timings, speedup, visualisation; the measurement itself is
`vlmzip.demo.run_demo`'s); `build_app` wraps it in a Gradio page and `launch` serves it on
localhost. Gradio is imported only by those two, so `ask` works without it. CPU, offline.
"""

from __future__ import annotations

import atexit
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from torch import nn

from vlmzip.adapters import adapter_class_for, check_supported
from vlmzip.cache import ImageCache, check_cache
from vlmzip.cli_options import APP_HOST, APP_PORT, DEFAULT_TOKENS
from vlmzip.config import VisionZipConfig, check_int
from vlmzip.demo import DemoRun, answer_from_cache, run_demo
from vlmzip.images import load_image
from vlmzip.methods import available_methods
from vlmzip.viz import image_pixel_values, model_adapter, reduced_images_for, token_summary, visualize

DEFAULT_MAX_NEW_TOKENS = 16  # when the model's generation config does not say
MAX_QUESTION_CHARS = 500
APP_CACHE_BYTES = 256 * 2**20  # reduced images kept by the page across questions
MAX_UPLOAD = "20mb"  # refused by the server before it reaches the model
BUDGET_TOKENS = "total tokens"
BUDGET_SPLIT = "dominant + contextual"
FALLBACK_QUESTIONS = ("what shape is in the image ?", "how many shapes are there ?", "what color is the circle ?")


# --- the computation -------------------------------------------------------------------------


def _check_question(question: str) -> str:
    if not isinstance(question, str):
        raise TypeError(f"question must be a string, got {type(question).__name__}")
    question = question.strip()
    if not question:
        raise ValueError("question must not be empty")
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"question must be at most {MAX_QUESTION_CHARS} characters, got {len(question)}")
    return question


def _run_dict(run: DemoRun) -> dict[str, Any]:
    return {
        "answer": run.answer,
        "visual_tokens": run.visual_tokens,
        "vision_ms": run.vision_ms,
        "prefill_ms": run.prefill_ms,
        "first_token_ms": run.first_token_ms,
    }


def ask(
    model: nn.Module,
    processor: Any,
    image: Image.Image | str | Path,
    question: str,
    budget: int | Sequence[int] = DEFAULT_TOKENS,
    method: str = "visionzip",
    *,
    heatmap: bool = True,
    max_new_tokens: int | None = None,
    repeats: int = 1,
    cache: ImageCache | None = None,
    positions: str = "compact",
) -> dict[str, Any]:
    """Answer `question` about `image` with all visual tokens and with the reduction, and time both.

    budget: total visual tokens per image (64 = 54 + 10, split as the paper does) or (dominant, contextual).
    method: one of `vlmzip.methods.available_methods()`; positions: `VisionZipConfig.positions`.
    Decoding is greedy; timings are the medians of `repeats` interleaved rounds (see `vlmzip.demo.run_demo`).

    Returns a dict: "question", "method", "dominant", "contextual", "summary" (token counts, as in
    the visualisation's title), "full" and "reduced" (each: "answer", "visual_tokens" reaching the
    language model, "vision_ms" tower (+ selection) and projector, "prefill_ms" language model,
    "first_token_ms" their sum), "speedup" and "prefill_speedup" (full / reduced time to first
    token and language-model prefill) and "visualization" (a PIL image from `vlmzip.visualize`).

    With `cache` (a `vlmzip.ImageCache` kept across calls, as the page does), the reduced answer goes
    through it and the result also holds "cached": the question answered again with the image's
    reduced tokens from the cache ("first_token_ms", "answer") and "seen_before" (the image was
    already reduced by an earlier question, so this answer skipped the vision tower too).
    """
    check_supported(model)
    image = load_image(image, processor)
    question = _check_question(question)
    config = VisionZipConfig.from_budget(budget, method=method, positions=positions)
    repeats = check_int("repeats", repeats, 1, 100)
    if not isinstance(heatmap, bool):
        raise TypeError(f"heatmap must be True or False, got {heatmap!r}")
    if max_new_tokens is None:
        generation_config = getattr(model, "generation_config", None)
        max_new_tokens = getattr(generation_config, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, 1, 1024)

    check_cache(cache)
    misses = cache.misses if cache is not None else 0
    result = run_demo(
        model, processor, image, question, config, repeats=repeats, max_new_tokens=max_new_tokens, cache=cache
    )
    panels = reduced_images_for(model, processor, image, result.reduction)
    full, reduced = result.full, result.reduced
    cached = None
    if cache is not None:
        seen_before = cache.misses == misses
        adapter = adapter_class_for(model)(model, config)
        again = answer_from_cache(model, processor, adapter, cache, image, question, max_new_tokens)
        cached = {"first_token_ms": again.first_token_ms, "answer": again.answer, "seen_before": seen_before}
    return {
        "question": question,
        "method": config.method,
        "dominant": config.dominant,
        "contextual": config.contextual,
        "summary": token_summary(panels),
        "full": _run_dict(full),
        "reduced": _run_dict(reduced),
        "speedup": full.first_token_ms / max(reduced.first_token_ms, 1e-9),
        "prefill_speedup": full.prefill_ms / max(reduced.prefill_ms, 1e-9),
        "visualization": visualize(panels, heatmap=heatmap),
        **({"cached": cached} if cached is not None else {}),
    }


def format_stats(result: dict[str, Any]) -> str:
    """Markdown table of an `ask` result: visual tokens, timings and speedups."""
    full, reduced = result["full"], result["reduced"]
    name = f"{result['method']} {result['dominant']} + {result['contextual']}"
    rows = [("all tokens", full), (name, reduced)]
    return "\n".join(
        [
            f"**{result['summary']}**",
            "",
            "| | visual tokens to the LLM | vision ms | LLM prefill ms | first token ms |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {label} | {run['visual_tokens']} | {run['vision_ms']:.1f} | {run['prefill_ms']:.1f} "
                f"| {run['first_token_ms']:.1f} |"
                for label, run in rows
            ),
            "",
            f"**Speedup: {result['prefill_speedup']:.2f}x LLM prefill, {result['speedup']:.2f}x time to first "
            "token** (CPU; vision = tower + selection + projector)",
            *_cached_lines(result.get("cached")),
        ]
    )


def _cached_lines(cached: dict[str, Any] | None) -> list[str]:
    if cached is None:
        return []
    earlier = " This image was already reduced for an earlier question." if cached["seen_before"] else ""
    return [
        "",
        f"**Asked again: {cached['first_token_ms']:.1f} ms to the first token** with the reduced tokens from the "
        f"image cache (no vision tower, no selection).{earlier}",
    ]


# --- examples --------------------------------------------------------------------------------


def draw_example_images(directory: str | Path, count: int = 3) -> list[Path]:
    """Write `count` simple scenes (coloured shapes on a plain background) as PNG files; return their paths."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    count = check_int("count", count, 1, 16)
    rng = np.random.default_rng(0)
    colors = [(220, 40, 40), (40, 90, 220), (40, 170, 60), (240, 200, 30)]
    paths = []
    for index in range(count):
        picture = Image.new("RGB", (336, 336), tuple(int(v) for v in rng.integers(170, 240, 3)))
        draw = ImageDraw.Draw(picture)
        for shape in range(index + 1):
            x, y = (int(v) for v in rng.integers(30, 250, 2))
            size = int(rng.integers(40, 80))
            box = [x, y, x + size, y + size]
            color = colors[(index + shape) % len(colors)]
            (draw.ellipse if shape % 2 == 0 else draw.rectangle)(box, fill=color)
        path = directory / f"example_{index + 1}.png"
        picture.save(path)
        paths.append(path)
    return paths


def default_examples(use_default_model: bool, directory: str | Path) -> list[tuple[Path, str]]:
    """(image path, question) pairs: the default model's held-out samples, else drawn scenes."""
    if use_default_model:
        from vlmzip.default_model import sample_inputs

        return [(Path(item["image_path"]), str(item["question"])) for item in sample_inputs()[:4]]
    paths = draw_example_images(directory, len(FALLBACK_QUESTIONS))
    return list(zip(paths, FALLBACK_QUESTIONS, strict=True))


# --- the web page ----------------------------------------------------------------------------


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry calls from an offline demo
    try:
        import gradio
    except ImportError:
        raise ImportError("the web demo needs gradio: pip install 'vlmzip[app]'") from None
    return gradio


def uploaded_path(payload: Any) -> str | None:
    """The file path of an image component's raw (unprocessed) value; None when nothing was uploaded."""
    if payload is None:
        return None
    if isinstance(payload, (str, Path)):
        return str(payload)
    path = payload.get("path") if isinstance(payload, dict) else getattr(payload, "path", None)
    if not path:
        raise ValueError("the upload did not arrive completely; upload the image again")
    return str(path)


def uploaded_name(payload: Any) -> str:
    """How messages name an upload: the file name the user picked, never the server's copy."""
    name = payload.get("orig_name") if isinstance(payload, dict) else getattr(payload, "orig_name", None)
    return f"'{Path(name).name}'" if isinstance(name, str) and Path(name).name else "the uploaded image"


# An absolute path (two or more parts) not glued to a word: what is left of server paths in messages.
_SERVER_PATH = re.compile(r"(?<![\w.~])/(?:[^\s'\"/:,;()]+/)+[^\s'\":,;()]*")


def public_message(error: BaseException, image_path: str | None, name: str) -> str:
    """`error`'s message for the page: the upload called `name`, no server path left in it."""
    message = str(error)
    if image_path:
        for shown in {image_path, str(Path(image_path).resolve())}:
            message = message.replace(shown, name)
    return _SERVER_PATH.sub("(server file)", message)


@contextmanager
def private_uploads() -> Iterator[Path]:
    """A new directory only this user can read, as Gradio's upload and cache folder while the app runs.

    Gradio keeps uploads in GRADIO_TEMP_DIR (by default a folder shared by every Gradio app on the
    machine, never emptied); it is pointed here for the duration and the folder is removed at the
    end, or at exit if the process stops first.
    """
    folder = Path(tempfile.mkdtemp(prefix="vlmzip-app-"))  # created with mode 0700
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    previous = os.environ.get("GRADIO_TEMP_DIR")
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    try:
        yield folder
    finally:
        if previous is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = previous
        shutil.rmtree(folder, ignore_errors=True)


def page_budget(mode: str, tokens: float | None, dominant: float | None, contextual: float | None) -> Any:
    """The budget the page's fields describe: a token count, or (dominant, contextual) in that mode."""
    if mode == BUDGET_SPLIT:
        return _whole("dominant", dominant), _whole("contextual", contextual)
    if mode != BUDGET_TOKENS:
        raise ValueError(f"budget mode must be {BUDGET_TOKENS!r} or {BUDGET_SPLIT!r}, got {mode!r}")
    return _whole("tokens", tokens)


def tokens_per_image(model: nn.Module, processor: Any) -> int:
    """The largest budget of one image (or crop): the tokens the tower yields at the size the processor
    produces, less a [CLS] the processor writes no placeholder for (LLaVA's "default" strategy).

    Read from the processor's output rather than the tower's config: a tower may be configured for
    another resolution than the one its model is used at (DINOv2: 518 in the config, 336 here).
    """
    pixel_values, _, _ = image_pixel_values(processor, Image.new("RGB", (64, 64)))
    geometry = model_adapter(model)
    return geometry.placeholders_for(geometry.tower_info.num_tokens(*pixel_values.shape[-2:]))


def build_app(
    model: nn.Module,
    processor: Any,
    *,
    examples: Sequence[tuple[str | Path, str]] = (),
    max_new_tokens: int | None = None,
    repeats: int = 3,
    positions: str = "compact",
) -> Any:
    """The Gradio Blocks page around `ask` (`positions` for every reduction).

    Components have stable `elem_id`s ("vz-image", "vz-ask", ...)."""
    gr = _gradio()
    check_supported(model)
    repeats = check_int("repeats", repeats, 1, 100)
    cache = ImageCache(max_bytes=APP_CACHE_BYTES)  # the same upload asked again skips the tower
    VisionZipConfig(positions=positions)  # a bad scheme fails before the page is built
    largest = tokens_per_image(model, processor)  # the page offers budgets up to all tokens
    default_split = VisionZipConfig.from_budget(min(DEFAULT_TOKENS, largest))

    # The events take the components' raw values (preprocess=False), so that a file that is not an
    # image reaches load_image and gets its one-line message instead of a decoding error from gradio.
    def on_ask(
        image: Any,
        question: str,
        mode: str,
        tokens: float | None,
        dominant: float | None,
        contextual: float | None,
        method: str,
        heatmap: bool,
    ) -> tuple[str, str, str, Image.Image]:
        image_path = None
        try:
            image_path = uploaded_path(image)
            if image_path is None:
                raise ValueError("upload an image first (or pick an example)")
            result = ask(
                model,
                processor,
                image_path,
                question,
                page_budget(mode, tokens, dominant, contextual),
                method,
                heatmap=bool(heatmap),
                max_new_tokens=max_new_tokens,
                repeats=repeats,
                cache=cache,
                positions=positions,
            )
        except (ValueError, TypeError, OSError) as error:
            raise gr.Error(public_message(error, image_path, uploaded_name(image))) from None
        return (
            result["full"]["answer"] or "(empty answer)",
            result["reduced"]["answer"] or "(empty answer)",
            format_stats(result),
            result["visualization"],
        )

    inputs_order = ("image", "question", "mode", "tokens", "dominant", "contextual", "method", "heatmap")
    with gr.Blocks(title="VisionZip demo") as page:
        gr.Markdown(
            "# VisionZip\nAsk about an image. The model answers twice: with every visual token, and with "
            "VisionZip's few dominant + contextual tokens. Runs locally on CPU.",
            elem_id="vz-intro",
        )
        fields: dict[str, Any] = {}
        with gr.Row():
            with gr.Column():
                fields["image"] = gr.Image(label="Image", type="filepath", sources=["upload"], elem_id="vz-image")
                fields["question"] = gr.Textbox(
                    label="Question", lines=1, max_length=MAX_QUESTION_CHARS, elem_id="vz-question"
                )
            with gr.Column():
                fields["mode"] = gr.Radio(
                    [BUDGET_TOKENS, BUDGET_SPLIT], value=BUDGET_TOKENS, label="Budget", elem_id="vz-mode"
                )
                fields["tokens"] = gr.Slider(
                    1, largest, value=default_split.tokens, step=1, label="Visual tokens per image", elem_id="vz-tokens"
                )
                with gr.Row(visible=False) as split_row:
                    fields["dominant"] = gr.Number(
                        value=default_split.dominant, precision=0, label="Dominant", elem_id="vz-dominant"
                    )
                    fields["contextual"] = gr.Number(
                        value=default_split.contextual, precision=0, label="Contextual", elem_id="vz-contextual"
                    )
                fields["method"] = gr.Dropdown(
                    list(available_methods()), value="visionzip", label="Method", elem_id="vz-method"
                )
                fields["heatmap"] = gr.Checkbox(value=True, label="Show the attention heatmap", elem_id="vz-heatmap")
                ask_button = gr.Button("Ask", variant="primary", elem_id="vz-ask")
                with gr.Row():
                    answer_full = gr.Textbox(label="Answer with all visual tokens", elem_id="vz-answer-full")
                    answer_reduced = gr.Textbox(label="Answer with VisionZip", elem_id="vz-answer-reduced")
                stats = gr.Markdown(elem_id="vz-stats")
        picture = gr.Image(label="What VisionZip keeps", show_label=False, type="pil", elem_id="vz-visualization")
        if examples:
            gr.Examples(
                examples=[[str(path), text] for path, text in examples],
                inputs=[fields["image"], fields["question"]],
                label="Examples",
                elem_id="vz-examples",
            )

        def show_budget_fields(mode: str) -> tuple[Any, Any]:
            return gr.update(visible=mode == BUDGET_TOKENS), gr.update(visible=mode == BUDGET_SPLIT)

        def check_upload(image: Any) -> None:
            # Right after the upload, not only when Ask is clicked: not an image, unreadable, too large.
            image_path = None
            try:
                image_path = uploaded_path(image)
                if image_path is not None:
                    load_image(image_path, processor)
            except (ValueError, OSError) as error:
                raise gr.Error(public_message(error, image_path, uploaded_name(image))) from None

        fields["image"].upload(check_upload, inputs=fields["image"], outputs=None, preprocess=False)
        fields["mode"].change(show_budget_fields, inputs=fields["mode"], outputs=[fields["tokens"], split_row])
        event_inputs = [fields[name] for name in inputs_order]
        outputs = [answer_full, answer_reduced, stats, picture]
        ask_button.click(on_ask, inputs=event_inputs, outputs=outputs, preprocess=False)
        fields["question"].submit(on_ask, inputs=event_inputs, outputs=outputs, preprocess=False)
    return page


def _whole(name: str, value: Any) -> int:
    """A number field's value as an int, or a ValueError naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    return int(number)


def launch(
    model: nn.Module,
    processor: Any,
    *,
    host: str = APP_HOST,
    port: int = APP_PORT,
    examples: Sequence[tuple[str | Path, str]] | None = None,
    use_default_examples: bool = False,
    max_new_tokens: int | None = None,
    repeats: int = 3,
    positions: str = "compact",
) -> None:
    """Serve the demo on http://host:port until interrupted (localhost only by default)."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"host must be a host name or address, got {host!r}")
    port = check_int("port", port, 1, 65535)
    with private_uploads() as folder:
        example_dir = folder / "examples"
        if examples is None:
            examples = default_examples(use_default_examples, example_dir)
        page = build_app(
            model, processor, examples=examples, max_new_tokens=max_new_tokens, repeats=repeats, positions=positions
        )
        allowed = sorted({str(Path(path).resolve().parent) for path, _ in examples} | {str(example_dir)})
        print(f"VisionZip demo on http://{host}:{port} (Ctrl+C to stop)", flush=True)
        page.queue(default_concurrency_limit=1).launch(
            server_name=host,
            server_port=port,
            share=False,
            inbrowser=False,
            ssr_mode=False,
            max_file_size=MAX_UPLOAD,
            allowed_paths=allowed,
            show_error=True,
            quiet=True,
        )
