"""Output of `bench` and `eval`: rich tables, JSON files and line plots (written whole, see vlmzip.outputs)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmzip.outputs import Inputs, refuse_overlap, replacing_file, write_json

__all__ = ["check_output_path", "plot_lines", "table_console", "write_json"]


def table_console(width: int) -> Any:
    """The console result tables go to: stdout, `width` columns wide in files and pipes (not 80 cropped ones)."""
    from rich.console import Console

    output = Console()
    return output if output.is_terminal else Console(width=width)


def check_output_path(path: str | Path | None, suffix: str, option: str, inputs: Inputs = ()) -> Path | None:
    """Validate an output path option before any work starts (suffix, not a directory, not an input)."""
    if path is None:
        return None
    path = Path(path)
    if path.suffix.lower() != suffix:
        raise ValueError(f"{option} must name a {suffix} file, got {str(path)!r}")
    if path.is_dir():
        raise ValueError(f"{option} names a directory: {path}")
    return refuse_overlap(path, inputs, option)


def plot_lines(
    series: dict[str, list[tuple[float, float]]],
    panels: Sequence[tuple[str, str]],
    path: str | Path,
    *,
    title: str,
    xlabel: str = "visual tokens per image",
    reference: dict[str, float] | None = None,
) -> Path:
    """One panel per (key, y label); `series[f"{method}|{key}"]` holds (x, y) points of that method.

    `reference` draws a horizontal line per panel key (e.g. the full-token value).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'vlmzip[plot]'") from None
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    methods = sorted({name.split("|")[0] for name in series})
    for axis, (key, ylabel) in zip(axes[0], panels, strict=True):
        for method in methods:
            points = sorted(series.get(f"{method}|{key}", []))
            if points:
                axis.plot([x for x, _ in points], [y for _, y in points], marker="o", label=method)
        if reference and key in reference:
            axis.axhline(reference[key], color="grey", linestyle="--", linewidth=1, label="all tokens")
        axis.set_xlabel(xlabel)
        axis.set_ylabel(ylabel)
        axis.grid(True, alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    try:
        with replacing_file(path) as temporary:
            figure.savefig(temporary, dpi=110, format=path.suffix.lstrip(".").lower() or "png")
    finally:
        plt.close(figure)
    return path


def row_label(row: dict[str, Any]) -> str:
    mass = row.get("attention_mass")
    scheme = row.get("quantize", "none")
    return row["method"] + (f" p={mass:g}" if mass is not None else "") + (f" {scheme}" if scheme != "none" else "")


def tokens_cell(row: dict[str, Any]) -> str:
    """Visual tokens per image: the count, or mean ± standard deviation [min-max] when images differ."""
    if row.get("tokens_min", row["tokens"]) == row.get("tokens_max", row["tokens"]):
        return str(row["tokens"])
    return f"{row['tokens']:.1f}±{row['tokens_std']:.1f} [{row['tokens_min']}-{row['tokens_max']}]"
