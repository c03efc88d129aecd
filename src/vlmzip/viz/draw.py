"""Drawing, PIL and numpy only: token panels, attention heatmaps, the legend, and `visualize` laying them out."""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from vlmzip.config import check_int
from vlmzip.core import GROUP_DOMINANT, GROUP_DROPPED, Reduction
from vlmzip.images import to_rgb
from vlmzip.viz.panels import ReducedImage, as_panels, token_summary

PANEL_SIZE = 336  # default long side of one panel in pixels (LLaVA-1.5's input size)
MIN_CELL = 4  # pixels per patch at least, so that outlines never cover a patch's centre
MARGIN = 12
GAP = 12
TITLE_HEIGHT = 30
CAPTION_HEIGHT = 22
LEGEND_ROW_HEIGHT = 22
SWATCH = 14
BACKGROUND = (255, 255, 255)
TEXT_COLOR = (20, 20, 20)
DOMINANT_OUTLINE = (255, 255, 255)
CONTEXTUAL_ALPHA = 0.55  # weight of a group's colour over the image
DROPPED_BRIGHTNESS = 0.2  # dropped patches keep this fraction of their brightness
HEATMAP_ALPHA = 0.7
MAX_LEGEND_GROUPS = 12
DEFAULT_COLUMNS = 4

# Anchors of a dark-to-bright perceptual colour map (matplotlib's "inferno"), interpolated linearly.
_HEAT_ANCHORS = np.array(
    [
        [0, 0, 4],
        [40, 11, 84],
        [101, 21, 110],
        [159, 42, 99],
        [212, 72, 66],
        [245, 125, 21],
        [250, 193, 39],
        [252, 255, 164],
    ],
    dtype=np.float64,
)
_GOLDEN_RATIO = (math.sqrt(5) - 1) / 2


def group_colors(count: int) -> list[tuple[int, int, int]]:
    """`count` distinct saturated colours; hues step by the golden ratio so neighbours differ most."""
    count = check_int("count", count, 0)
    colors = []
    for index in range(count):
        hue = (index * _GOLDEN_RATIO) % 1.0
        value = 0.95 if index % 2 == 0 else 0.8
        red, green, blue = colorsys.hsv_to_rgb(hue, 0.85, value)
        colors.append((round(red * 255), round(green * 255), round(blue * 255)))
    return colors


def heat_colors(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB (float, 0..255) on the dark-to-bright colour map."""
    position = np.clip(values, 0.0, 1.0) * (len(_HEAT_ANCHORS) - 1)
    low = np.floor(position).astype(np.int64).clip(0, len(_HEAT_ANCHORS) - 2)
    fraction = (position - low)[..., None]
    return _HEAT_ANCHORS[low] * (1 - fraction) + _HEAT_ANCHORS[low + 1] * fraction


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, font: Any) -> int:
    return int(math.ceil(draw.textlength(text, font=font)))


def _fit(image: Image.Image, grid: tuple[int, int], cell: int) -> np.ndarray:
    """The image scaled to cover the grid at `cell` pixels per patch and centre-cropped, as float RGB."""
    rows, cols = grid
    fitted = ImageOps.fit(to_rgb(image), (cols * cell, rows * cell), method=Image.Resampling.BICUBIC)
    return np.asarray(fitted, dtype=np.float64)


def _per_pixel(cells: np.ndarray, cell: int) -> np.ndarray:
    return cells.repeat(cell, axis=0).repeat(cell, axis=1)


def _token_panel(panel: ReducedImage, cell: int) -> Image.Image:
    base = _fit(panel.image, panel.grid, cell)
    groups = panel.patch_groups()
    colors = np.array(group_colors(max(int(groups.max()) + 1, 0)) or [(0, 0, 0)], dtype=np.float64)
    overlay = np.zeros((*groups.shape, 3))
    alpha = np.zeros(groups.shape)
    contextual = groups >= 0
    overlay[contextual] = colors[groups[contextual]]
    alpha[contextual] = CONTEXTUAL_ALPHA
    alpha[groups == GROUP_DROPPED] = 1 - DROPPED_BRIGHTNESS  # blend towards black
    alpha_pixels = _per_pixel(alpha, cell)[..., None]
    blended = base * (1 - alpha_pixels) + _per_pixel(overlay, cell) * alpha_pixels
    result = Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))

    # Outline the dominant region: an edge of a dominant patch is drawn where its neighbour is not dominant.
    draw = ImageDraw.Draw(result)
    dominant = groups == GROUP_DOMINANT
    rows, cols = panel.grid
    for row, col in zip(*np.nonzero(dominant), strict=True):
        x0, y0, x1, y1 = col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1
        if row == 0 or not dominant[row - 1, col]:
            draw.line([(x0, y0), (x1, y0)], fill=DOMINANT_OUTLINE)
        if row == rows - 1 or not dominant[row + 1, col]:
            draw.line([(x0, y1), (x1, y1)], fill=DOMINANT_OUTLINE)
        if col == 0 or not dominant[row, col - 1]:
            draw.line([(x0, y0), (x0, y1)], fill=DOMINANT_OUTLINE)
        if col == cols - 1 or not dominant[row, col + 1]:
            draw.line([(x1, y0), (x1, y1)], fill=DOMINANT_OUTLINE)
    return result


def _heat_panel(panel: ReducedImage, cell: int) -> Image.Image:
    base = _fit(panel.image, panel.grid, cell)
    scores = panel.patch_scores()
    if scores is None:
        raise ValueError("heatmap=True needs the reduction's per-patch scores, but result.scores has none")
    scores = scores - scores.min()
    peak = scores.max()
    # Square-root scale: [CLS] attention is very peaked, a linear scale would show a few dots on black.
    normalised = np.sqrt(scores / peak) if peak > 0 else np.zeros_like(scores)
    heat = _per_pixel(heat_colors(normalised), cell)
    blended = base * (1 - HEATMAP_ALPHA) + heat * HEATMAP_ALPHA
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8))


def _legend_items(panels: Sequence[ReducedImage], heatmap: bool) -> list[tuple[str, Any]]:
    """(text, swatch) pairs; swatch is an RGB colour, 'dominant', 'heat' or None (text only)."""
    dominant_patches = sum(panel.dominant - panel.kept_prefix_tokens for panel in panels)
    contextual = max(panel.contextual for panel in panels)
    groups_drawn = max(int(panel.patch_groups().max()) + 1 for panel in panels)
    items: list[tuple[str, Any]] = []
    if dominant_patches:
        items.append((f"dominant patches ({dominant_patches})", "dominant"))
    if groups_drawn > 0:
        label = "contextual token" if contextual == 1 else f"contextual tokens ({contextual} per panel)"
        items.append((f"{label}, one colour each:", None))
        for index, color in enumerate(group_colors(min(groups_drawn, MAX_LEGEND_GROUPS))):
            items.append((str(index + 1), color))
        if groups_drawn > MAX_LEGEND_GROUPS:
            items.append((f"... {groups_drawn - MAX_LEGEND_GROUPS} more", None))
    if any((panel.patch_groups() == GROUP_DROPPED).any() for panel in panels):
        items.append(("dropped", (round(255 * DROPPED_BRIGHTNESS * 0.5),) * 3))
    kept_prefix = sum(panel.kept_prefix_tokens for panel in panels)
    if kept_prefix:
        items.append((f"+ {kept_prefix} [CLS]/prefix token(s) kept, not on the grid", None))
    if heatmap:
        items.append((f"{panels[0].score_name}: low to high", "heat"))
    return items


def _layout_legend(
    draw: ImageDraw.ImageDraw, items: list[tuple[str, Any]], width: int, font: Any
) -> list[tuple[int, int, str, Any]]:
    """(x, row, text, swatch) of each item, wrapped to `width`."""
    placed, x, row = [], 0, 0
    for text, swatch in items:
        swatch_width = 0 if swatch is None else (3 * SWATCH if swatch == "heat" else SWATCH) + 4
        item_width = swatch_width + _text_width(draw, text, font) + 12
        if x > 0 and x + item_width > width:
            x, row = 0, row + 1
        placed.append((x, row, text, swatch))
        x += item_width
    return placed


def _draw_swatch(canvas: Image.Image, draw: ImageDraw.ImageDraw, x: int, y: int, swatch: Any) -> int:
    """Draw a legend swatch at (x, y); return its width."""
    if swatch == "dominant":
        draw.rectangle([x, y, x + SWATCH - 1, y + SWATCH - 1], fill=(110, 110, 110), outline=DOMINANT_OUTLINE)
        draw.rectangle([x - 1, y - 1, x + SWATCH, y + SWATCH], outline=(60, 60, 60))
        return SWATCH
    if swatch == "heat":
        ramp = heat_colors(np.linspace(0, 1, 3 * SWATCH))
        strip = np.repeat(ramp[None], SWATCH, axis=0).round().astype(np.uint8)
        canvas.paste(Image.fromarray(strip), (x, y))
        return 3 * SWATCH
    draw.rectangle([x, y, x + SWATCH - 1, y + SWATCH - 1], fill=tuple(swatch))
    return SWATCH


def visualize(
    image: Image.Image | ReducedImage | Sequence[Image.Image] | Sequence[ReducedImage],
    result: Reduction | Sequence[Reduction] | None = None,
    *,
    grid: tuple[int, int] | None = None,
    num_prefix_tokens: int | None = None,
    heatmap: bool = False,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    panel_size: int = PANEL_SIZE,
    columns: int | None = None,
    save: str | Path | None = None,
) -> Image.Image:
    """Draw which tokens a reduction kept, merged and dropped, over the image the tower saw.

    Args:
        image: a PIL image, or one per crop / frame; or what `reduce_image` returns (then leave
            `result` out).
        result: a `Reduction` (batch = number of images) or a list of them, one row per image.
        grid: (rows, cols) of the patch grid; inferred for square grids when left out.
        num_prefix_tokens: tokens before the patches ([CLS] = 1); inferred from the scores when left out.
        heatmap: also draw the selection's attention scores (square-root scale) beside each panel.
        labels: a caption per panel (default "image 1", "image 2", ... when there are several).
        title: replaces the default title, the token counts ("64 of 577 tokens: 54 dominant + 10 contextual").
        panel_size: long side of each panel in pixels (each patch gets panel_size // max(rows, cols) pixels).
        columns: panels per row (default: up to 4, or 2 with heatmaps).
        save: also write the picture to this path (format from the extension).

    Returns an RGB PIL image. `image.info["visionzip_panels"]` lists each panel's pixel boxes
    ("tokens", "heatmap": (x0, y0, x1, y1), exclusive ends), "grid" and "cell" (pixels per patch).
    """
    if not isinstance(heatmap, bool):
        raise TypeError(f"heatmap must be True or False, got {heatmap!r}")
    panels = as_panels(image, result, grid, num_prefix_tokens, labels)
    panel_size = check_int("panel_size", panel_size, 16, 4096)
    if columns is None:  # balanced rows of at most DEFAULT_COLUMNS pictures (a heatmap counts as one)
        limit = max(1, DEFAULT_COLUMNS // 2) if heatmap else DEFAULT_COLUMNS
        columns = math.ceil(len(panels) / math.ceil(len(panels) / limit))
    columns = min(check_int("columns", columns, 1), len(panels))
    if title is not None and not isinstance(title, str):
        raise TypeError(f"title must be a string, got {type(title).__name__}")

    cells = [max(MIN_CELL, panel_size // max(panel.grid)) for panel in panels]
    sizes = [(panel.grid[1] * cell, panel.grid[0] * cell) for panel, cell in zip(panels, cells, strict=True)]
    slot_width = max(w for w, _ in sizes) * (2 if heatmap else 1) + (GAP if heatmap else 0)
    slot_height = CAPTION_HEIGHT + max(h for _, h in sizes)
    grid_rows = math.ceil(len(panels) / columns)
    content_width = columns * slot_width + (columns - 1) * GAP

    title_font, font = _font(16), _font(13)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    title = token_summary(panels) if title is None else title
    width = 2 * MARGIN + max(content_width, _text_width(scratch, title, title_font))
    legend = _layout_legend(scratch, _legend_items(panels, heatmap), width - 2 * MARGIN, font)
    legend_rows = 1 + max(row for _, row, _, _ in legend)
    height = MARGIN + TITLE_HEIGHT + grid_rows * slot_height + (grid_rows - 1) * GAP + GAP
    height += legend_rows * LEGEND_ROW_HEIGHT + MARGIN

    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, MARGIN), title, fill=TEXT_COLOR, font=title_font)
    boxes = []
    for index, (panel, cell, (panel_width, panel_height)) in enumerate(zip(panels, cells, sizes, strict=True)):
        x = MARGIN + (index % columns) * (slot_width + GAP)
        y = MARGIN + TITLE_HEIGHT + (index // columns) * (slot_height + GAP)
        name = panel.label or (f"image {index + 1}" if len(panels) > 1 else "")
        counts = f"{panel.kept_tokens} of {panel.total_tokens} tokens"
        draw.text((x, y + 3), f"{name}: {counts}" if name else counts, fill=TEXT_COLOR, font=font)
        top = y + CAPTION_HEIGHT
        canvas.paste(_token_panel(panel, cell), (x, top))
        box = {"label": name, "grid": panel.grid, "cell": cell}
        box["tokens"] = (x, top, x + panel_width, top + panel_height)
        box["heatmap"] = None
        if heatmap:
            heat_x = x + panel_width + GAP
            draw.text((heat_x, y + 3), panel.score_name, fill=TEXT_COLOR, font=font)
            canvas.paste(_heat_panel(panel, cell), (heat_x, top))
            box["heatmap"] = (heat_x, top, heat_x + panel_width, top + panel_height)
        boxes.append(box)

    legend_top = MARGIN + TITLE_HEIGHT + grid_rows * slot_height + (grid_rows - 1) * GAP + GAP
    for x, row, text, swatch in legend:
        left, top = MARGIN + x, legend_top + row * LEGEND_ROW_HEIGHT
        if swatch is not None:
            left += _draw_swatch(canvas, draw, left, top + 2, swatch) + 4
        draw.text((left, top + 2), text, fill=TEXT_COLOR, font=font)

    canvas.info["visionzip_panels"] = boxes
    if save is not None:
        _save(canvas, save)
    return canvas


def check_output_path(path: str | Path) -> Path:
    """`path` as a Path if a picture can be written there (existing directory, known extension), else raise."""
    if not isinstance(path, (str, Path)) or not str(path):
        raise TypeError(f"output path must be a file path, got {path!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    if path.is_dir():
        raise ValueError(f"output path is a directory: {path}")
    extension = path.suffix.lower()
    if extension not in Image.registered_extensions():
        raise ValueError(f"unknown image format {extension or '(no extension)'!r} for {path}; use .png, .jpg or .webp")
    return path


def _save(picture: Image.Image, path: str | Path) -> Path:
    path = check_output_path(path)
    picture.save(path)
    return path
