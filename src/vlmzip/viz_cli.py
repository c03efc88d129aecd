"""`vlmzip show` (draw what VisionZip keeps of an image) and `vlmzip app` (the local web demo)."""

from __future__ import annotations

import argparse

from vlmzip.cli_options import (
    APP_HOST,
    APP_PORT,
    add_budget_options,
    add_position_options,
    config_from_args,
    load_model_for_cli,
)


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        metavar="DIR",
        help="local transformers model directory of a supported family (default: the embedded default model)",
    )


def _show(args: argparse.Namespace) -> int:
    from vlmzip.loading import load_image
    from vlmzip.outputs import model_inputs, refuse_overlap, save_image
    from vlmzip.viz import check_output_path, reduce_image, token_summary, visualize

    output = refuse_overlap(check_output_path(args.output), [("--image", args.image), *model_inputs(args.model)])
    config = config_from_args(args)  # bad budgets fail before any loading
    image = load_image(args.image)
    model, processor = load_model_for_cli(args.model)
    panels = reduce_image(model, processor, image, config)
    save_image(visualize(panels, heatmap=args.heatmap), output)
    print(f"wrote {output}: {token_summary(panels)} ({config.method})")
    return 0


def _app(args: argparse.Namespace) -> int:
    from vlmzip.app import launch
    from vlmzip.config import VisionZipConfig, check_int

    port = check_int("--port", args.port, 1, 65535)
    VisionZipConfig(positions=args.positions)
    model, processor = load_model_for_cli(args.model)
    launch(
        model,
        processor,
        host=args.host,
        port=port,
        use_default_examples=args.model is None,
        max_new_tokens=args.max_new_tokens,
        repeats=args.repeats,
        positions=args.positions,
    )
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    help_text = "Draw which patches VisionZip keeps and merges for an image."
    show = subcommands.add_parser(
        "show",
        help=help_text,
        description=help_text
        + " Dominant patches are outlined in white, each contextual group has its own colour, dropped patches "
        "are dark; --heatmap adds the attention scores the selection used.",
    )
    show.add_argument("--image", required=True, metavar="PATH", help="image file (PNG, JPEG, ...)")
    _add_model_argument(show)
    add_budget_options(show)
    show.add_argument("--heatmap", action="store_true", help="also draw the attention heatmap beside the tokens")
    show.add_argument("-o", "--output", required=True, metavar="PATH", help="picture to write (.png, .jpg, .webp)")
    show.set_defaults(run=_show)

    help_text = "Serve the web demo on localhost: answers with all tokens vs VisionZip, timings, visualisation."
    app = subcommands.add_parser("app", help=help_text, description=help_text + " Needs gradio (vlmzip[app]).")
    _add_model_argument(app)
    app.add_argument("--host", default=APP_HOST, help=f"address to listen on (default {APP_HOST})")
    app.add_argument("--port", type=int, default=APP_PORT, help=f"port (default {APP_PORT})")
    app.add_argument("--max-new-tokens", type=int, help="answer length limit (default: the model's generation config)")
    app.add_argument("--repeats", type=int, default=3, help="prefill timing: best of this many runs (default 3)")
    add_position_options(app)
    app.set_defaults(run=_app)
