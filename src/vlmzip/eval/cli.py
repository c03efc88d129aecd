"""`vlmzip eval`: accuracy and retention of every method at every budget, resumable."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DEFAULT_JSON = "vlmzip-eval.json"


def with_retention(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add retention = accuracy / full-token accuracy (None until the full-token row exists or when it is 0)."""
    full = next((row for row in rows if row["method"] == "full"), None)
    for row in rows:
        base = full["accuracy"] if full else 0.0
        row["retention"] = row["accuracy"] / base if base else None
    return rows


class ResultsFile:
    """Results persisted after every (method, budget), so that a rerun skips what is done.

    The file holds {"settings": ..., "results": [row, ...]}; a file written with other settings
    (model, data, answer length, prompt) is refused unless `overwrite` is set.
    """

    def __init__(self, path: Path | None, settings: dict[str, Any], overwrite: bool = False) -> None:
        import json

        self.path = path
        self.settings = settings
        self.rows: list[dict[str, Any]] = []
        if path is None or not path.exists() or overwrite:
            return
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            stored_settings, rows = data["settings"], data["results"]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{path} is not a results file of vlmzip eval; choose another --json path") from None
        if stored_settings != settings:
            changed = sorted(
                key for key in settings.keys() | stored_settings.keys() if settings.get(key) != stored_settings.get(key)
            )
            raise ValueError(
                f"{path} holds results for different settings ({', '.join(changed)}); "
                "use another --json path, or --overwrite to start over"
            )
        self.rows = rows

    def done(self, method: str, budget: int | None, attention_mass: float | None = None) -> bool:
        return any(row_key(row) == (method, budget, attention_mass) for row in self.rows)

    def add(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with_retention(self.rows)
        if self.path is not None:
            from vlmzip.bench.report import write_json

            write_json(self.path, {"settings": self.settings, "results": self.rows})


def row_key(row: dict[str, Any]) -> tuple[str, int | None, float | None]:
    """(method, budget, attention mass) of a results row, as `Variant.key` gives it."""
    return row["method"], row["budget"], row.get("attention_mass")


def render_table(rows: list[dict[str, Any]], title: str) -> Any:
    from rich.table import Table

    from vlmzip.bench.report import row_label, tokens_cell

    types = sorted({kind for row in rows for kind in row["per_type"]})
    table = Table(title=title, title_justify="left")
    for column in ["method", "tokens", "accuracy", "retention", "n", *types]:
        table.add_column(column, justify="left" if column == "method" else "right")
    for row in rows:
        retention = f"{row['retention'] * 100:.1f}%" if row["retention"] is not None else "-"
        per_type = [f"{row['per_type'][kind] * 100:.1f}" if kind in row["per_type"] else "-" for kind in types]
        table.add_row(
            row_label(row), tokens_cell(row), f"{row['accuracy'] * 100:.1f}%", retention, str(row["n"]), *per_type
        )
    return table


def plot_eval(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    from vlmzip.bench.report import plot_lines

    series: dict[str, list[tuple[float, float]]] = {}
    full = next((row for row in rows if row["method"] == "full"), None)
    for row in rows:
        if row["method"] == "full":
            continue
        # Adaptive rows of a method form a line of their own, at their mean tokens per image.
        name = row["method"] + (" (adaptive)" if row.get("attention_mass") is not None else "")
        accuracy = series.setdefault(f"{name}|accuracy", [])
        if full is not None and not accuracy:  # every line ends at the full-token point
            accuracy.append((full["tokens"], full["accuracy"] * 100))
            series[f"{name}|retention"] = [(full["tokens"], 100.0)]
        accuracy.append((row["tokens"], row["accuracy"] * 100))
        if row["retention"] is not None:
            series.setdefault(f"{name}|retention", []).append((row["tokens"], row["retention"] * 100))
    for points in series.values():
        points.sort()
    reference = {"accuracy": full["accuracy"] * 100, "retention": 100.0} if full else None
    panels = [("accuracy", "accuracy (%)"), ("retention", "retention vs all tokens (%)")]
    return plot_lines(series, panels, path, title=title, reference=reference)


def run_eval(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from vlmzip.bench.report import check_output_path, table_console
    from vlmzip.cli_options import check_device, check_model_dir, dtype_named, load_model_for_cli, variants_from_args
    from vlmzip.config import check_int
    from vlmzip.eval.evaluator import Evaluator
    from vlmzip.eval.items import DEFAULT_LIMIT, held_out_set, jsonl_set
    from vlmzip.outputs import model_inputs
    from vlmzip.prompts import build_prompt
    from vlmzip.variants import DEFAULT_BUDGETS

    inputs = [*model_inputs(args.model), ("--data", args.data)]
    json_path = check_output_path(args.json, ".json", "--json", inputs)
    plot_path = check_output_path(args.plot, ".png", "--plot", inputs)
    if json_path is not None and plot_path is not None and json_path.resolve() == plot_path.resolve():
        raise ValueError("--json and --plot must be different files")
    batch_size = check_int("--batch-size", args.batch_size, 1)
    max_new_tokens = check_int("--max-new-tokens", args.max_new_tokens, 1)
    limit = check_int("--limit", args.limit, 1) if args.limit is not None else None
    if args.prompt is not None and "{question}" not in args.prompt:
        raise ValueError("--prompt must contain {question}")
    variants_from_args(args, DEFAULT_BUDGETS)  # bad names and budgets fail before loading
    check_device(args.device)
    if args.quantize != "none" and args.device != "cpu":
        raise ValueError(f"--quantize {args.quantize} runs on CPU only; leave --device at cpu")
    cache_mb = check_int("--cache-mb", args.cache_mb, 0)
    if args.no_cache and args.cache_dir is not None:
        raise ValueError("give either --no-cache or --cache-dir, not both")

    console = Console(stderr=True, soft_wrap=True)  # status lines hold paths: never break them
    with console.status("loading data and model"):
        if args.data is not None:
            data = jsonl_set(args.data, limit, on_error=args.on_error)
        else:
            from vlmzip.default_model.build import assembled_seed

            check_model_dir(args.model)
            # A copy or a rebuild of the embedded model has a held-out split of its own (its seed's).
            seed = 0 if args.model is None else assembled_seed(args.model)
            if seed is None:
                raise ValueError(
                    "--data is required with --model (the held-out split belongs to the embedded model and "
                    "to directories built from its recipe)"
                )
            data = held_out_set(limit or DEFAULT_LIMIT, seed=seed)
        if args.data is not None:  # an image the data names is an input too
            images = [("an image of --data", item.image_key) for item in {i.image_key: i for i in data.items}.values()]
            check_output_path(args.json, ".json", "--json", images)
            check_output_path(args.plot, ".png", "--plot", images)
        model, processor = load_model_for_cli(args.model, dtype=dtype_named(args.dtype))
        model = model.to(args.device)
        if args.quantize != "none":
            from vlmzip.bench.quantize import quantize_language_model

            quantize_language_model(model, args.quantize)
        image_cache = None
        if not args.no_cache:
            from vlmzip.cache import ImageCache

            image_cache = ImageCache(max_bytes=cache_mb * 2**20, directory=args.cache_dir)

        def prompt(question: str) -> str:
            return build_prompt(processor, question, template=args.prompt)

        variants = variants_from_args(args, DEFAULT_BUDGETS, model, console)
        evaluator = Evaluator(
            model,
            processor,
            data,
            prompt=prompt,
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            image_cache=image_cache,
        )
    settings = {
        "model": str(Path(args.model).resolve()) if args.model else "embedded default model",
        "data": data.source,
        "n": len(data.items),
        "max_new_tokens": max_new_tokens,
        "prompt": prompt("{question}"),
        "dtype": args.dtype,
    }
    if args.quantize != "none":  # earlier results files have no such entry: they stay resumable
        settings["quantize"] = args.quantize
    if args.positions != "compact":  # files of the default scheme stay resumable as they were written
        settings["positions"] = args.positions
    results = ResultsFile(json_path, settings, overwrite=args.overwrite)
    todo = [variant for variant in variants if not results.done(*variant.key)]
    if len(todo) < len(variants):
        console.print(f"resuming {json_path}: {len(variants) - len(todo)} of {len(variants)} already done")

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("evaluating", total=len(todo) * len(data.items))
        for variant in todo:
            progress.update(task, description=f"evaluating {variant.label}")
            accuracy = evaluator.evaluate(variant, progress=lambda done: progress.update(task, advance=done))
            results.add(accuracy.row())

    order = {variant.key: index for index, variant in enumerate(variants)}
    rows = sorted((row for row in results.rows if row_key(row) in order), key=lambda row: order[row_key(row)])
    rows = with_retention(rows)
    title = f"{settings['model']} on {data.source}: exact-match accuracy, greedy, {max_new_tokens} new tokens"
    if args.positions != "compact":
        title += f", positions {args.positions}"
    output = table_console(width=160)
    output.print(render_table(rows, title))
    if json_path is not None:
        console.print(f"results: {json_path}")
    from vlmzip.bench.report import row_label

    if plot_path is not None:  # every result of the file: runs resumed into one file draw one picture
        everything = with_retention(sorted(results.rows, key=lambda row: (row_label(row), row["tokens"])))
        plot_eval(everything, plot_path, title="accuracy and retention vs visual tokens")
        console.print(f"plot: {plot_path}")
    return 0


def register(subcommands: argparse._SubParsersAction) -> None:
    from vlmzip.cli_options import DTYPE_NAMES, add_variant_options

    help_text = "Accuracy and retention of every reduction method at every budget (greedy, batched, resumable)."
    parser = subcommands.add_parser(
        "eval",
        help=help_text,
        description=help_text
        + " Without arguments: the embedded model on the first 500 questions of its held-out split, every "
        "method at 192, 128 and 64 tokens, plus all tokens. Results are saved after each method and budget; "
        "a rerun with the same --json file skips what is done.",
    )
    parser.add_argument("--model", help="local model directory (default: the embedded default model)")
    parser.add_argument(
        "--data",
        help="VQA JSONL file (default: the embedded model's held-out split; required with a --model that "
        "is not built from the embedded model's recipe)",
    )
    parser.add_argument("--limit", type=int, help="evaluate the first N questions (default: 500 held-out, all JSONL)")
    add_variant_options(
        parser,
        methods_help="methods (default: all the model supports)",
        tokens_help="visual tokens per image (per crop for AnyRes models; default: 192 128 64)",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="questions per generate() call (default 16)")
    parser.add_argument("--max-new-tokens", type=int, default=8, help="answer length limit (default 8)")
    parser.add_argument("--prompt", help="prompt template with {question} (default: the model's chat template)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32", help="(float32)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument(
        "--quantize",
        choices=["none", "int8"],
        default="none",
        help="int8: the language model's linear layers get int8 weights (PyTorch dynamic quantization, CPU)",
    )
    parser.add_argument(
        "--cache-mb",
        type=int,
        default=512,
        help="memory of the image cache: each image is reduced once per variant, whatever its questions (512)",
    )
    parser.add_argument("--cache-dir", help="also keep the image cache in this folder, for runs that restart")
    parser.add_argument("--no-cache", action="store_true", help="encode the images of every batch (no image cache)")
    parser.add_argument("--on-error", choices=["stop", "skip"], default="stop", help="bad JSONL lines (default stop)")
    parser.add_argument("--json", default=DEFAULT_JSON, help=f"results file, resumed when it exists ({DEFAULT_JSON})")
    parser.add_argument("--overwrite", action="store_true", help="discard results already in --json")
    parser.add_argument("--plot", help="draw accuracy and retention vs tokens to this .png file")
    parser.set_defaults(run=run_eval)
