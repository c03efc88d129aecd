"""See what VisionZip keeps: dominant patches, contextual groups and the attention behind them.

`visualize(image, reduction)` draws, for each image (or crop / frame), the patch grid over the image:
dominant patches as they are (outlined in white), every contextual group tinted in its own colour,
dropped patches darkened; optionally the attention scores the selection used as a heatmap beside
it; a title with the token counts and a legend. `reduce_image(model, processor, image)` produces
what `visualize` needs from a model and a PIL image.

Geometry: the patch grid is laid over the image as the vision tower saw it. `reduce_image` returns
exactly that view (the processor's output, un-normalised), so patches line up pixel for pixel.
Given any other image, `visualize` scales it to cover the grid's aspect ratio and centre-crops it,
which is what CLIP-style processors do (shortest edge, then centre crop); for processors that pad
or stretch instead, pass the processor's view.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torch import nn

from vlmzip.config import VisionZipConfig, check_int
from vlmzip.core import GROUP_DOMINANT, GROUP_DROPPED, Reduction
from vlmzip.images import load_image, to_rgb

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


@dataclass(frozen=True)
class ReducedImage:
    """One image (or crop / frame) as the tower saw it, and what a reduction did to its tokens.

    image: the pixels the patch grid covers (for `reduce_image`: the processor's output).
    reduction: a `Reduction` of batch size 1.
    grid: (rows, cols) of the patch grid; patches follow `num_prefix_tokens` leading tokens in raster order.
    label: shown above the panel when there are several.
    """

    image: Image.Image
    reduction: Reduction
    grid: tuple[int, int]
    num_prefix_tokens: int
    label: str = ""

    @property
    def total_tokens(self) -> int:
        """Tokens the tower yields for this image."""
        return int(self.reduction.groups.shape[1])

    @property
    def kept_tokens(self) -> int:
        """Tokens that reach the language model: dominant + contextual."""
        return int(self.reduction.features.shape[1])

    @property
    def dominant(self) -> int:
        return int(self.reduction.kept_indices.shape[1])

    @property
    def contextual(self) -> int:
        return self.kept_tokens - self.dominant

    @property
    def kept_prefix_tokens(self) -> int:
        """Kept tokens that are not patches ([CLS], registers): they have no place on the grid."""
        return int((self.reduction.kept_indices[0] < self.num_prefix_tokens).sum())

    def patch_groups(self) -> np.ndarray:
        """(rows, cols) int array: GROUP_DOMINANT, GROUP_DROPPED or the contextual group of each patch."""
        rows, cols = self.grid
        groups = self.reduction.groups[0, self.num_prefix_tokens :]
        return groups.detach().cpu().numpy().astype(np.int64).reshape(rows, cols)

    def patch_scores(self) -> np.ndarray | None:
        """(rows, cols) float array of the selection scores over the patches, or None."""
        scores = self.reduction.scores
        rows, cols = self.grid
        if scores is None or scores.ndim != 2 or scores.shape[1] < rows * cols:
            return None
        # Patches are the last tokens in both layouts: [CLS]-row scores (N - 1) and received attention (N).
        return scores[0, -rows * cols :].detach().float().cpu().numpy().reshape(rows, cols)

    @property
    def score_name(self) -> str:
        scores = self.reduction.scores
        if scores is not None and scores.shape[1] == self.total_tokens:
            return "attention received"
        return "[CLS] attention"


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


def token_summary(panels: Sequence[ReducedImage]) -> str:
    """'64 of 577 tokens: 54 dominant + 10 contextual' (summed, with the panel count, for several)."""
    kept = sum(panel.kept_tokens for panel in panels)
    total = sum(panel.total_tokens for panel in panels)
    dominant = sum(panel.dominant for panel in panels)
    where = f" over {len(panels)} panels" if len(panels) > 1 else ""
    return f"{kept} of {total} tokens{where}: {dominant} dominant + {kept - dominant} contextual"


# --- building panels --------------------------------------------------------------------------


def _split_reduction(reduction: Reduction) -> list[Reduction]:
    """One batch-1 Reduction per row of a batched one."""
    if not isinstance(reduction, Reduction):
        raise TypeError(f"result must be a visionzip Reduction (or a list of them), got {type(reduction).__name__}")
    rows = []
    for index in range(reduction.groups.shape[0]):
        part = slice(index, index + 1)
        rows.append(
            Reduction(
                features=reduction.features[part],
                kept_indices=reduction.kept_indices[part],
                groups=reduction.groups[part],
                scores=None if reduction.scores is None else reduction.scores[part],
            )
        )
    return rows


def _resolve_layout(
    reduction: Reduction, grid: tuple[int, int] | None, num_prefix_tokens: int | None
) -> tuple[tuple[int, int], int]:
    """(grid, num_prefix_tokens) given or inferred: a square grid, prefix from the scores' length."""
    num_tokens = int(reduction.groups.shape[1])
    if grid is not None:
        if (
            not isinstance(grid, (tuple, list))
            or len(grid) != 2
            or not all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in grid)
        ):
            raise ValueError(f"grid must be (rows, cols) of positive integers, got {grid!r}")
        grid = (int(grid[0]), int(grid[1]))
    if num_prefix_tokens is None:
        if grid is not None:
            num_prefix_tokens = num_tokens - grid[0] * grid[1]
        elif reduction.scores is not None and reduction.scores.shape[1] in (num_tokens - 1, num_tokens):
            # [CLS]-row scores leave out exactly the [CLS] column; received attention covers every token.
            num_prefix_tokens = num_tokens - int(reduction.scores.shape[1])
        else:
            num_prefix_tokens = 1 if math.isqrt(num_tokens - 1) ** 2 == num_tokens - 1 else 0
    num_prefix_tokens = check_int("num_prefix_tokens", num_prefix_tokens, 0, num_tokens - 1)
    if grid is None:
        side = math.isqrt(num_tokens - num_prefix_tokens)
        if side * side != num_tokens - num_prefix_tokens:
            raise ValueError(
                f"grid: cannot infer the patch grid of {num_tokens} tokens with {num_prefix_tokens} prefix tokens; "
                "pass grid=(rows, cols) and num_prefix_tokens"
            )
        grid = (side, side)
    if num_prefix_tokens + grid[0] * grid[1] != num_tokens:
        raise ValueError(
            f"grid {grid} with {num_prefix_tokens} prefix tokens does not match the reduction's {num_tokens} tokens"
        )
    return grid, num_prefix_tokens


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _as_panels(
    image: Any,
    result: Reduction | Sequence[Reduction] | None,
    grid: tuple[int, int] | None,
    num_prefix_tokens: int | None,
    labels: Sequence[str] | None,
) -> list[ReducedImage]:
    images = _as_list(image)
    if not images:
        raise ValueError("image must be an image or a non-empty list of images")
    if result is None:
        if not all(isinstance(item, ReducedImage) for item in images):
            raise TypeError("result is required unless image is a ReducedImage (or a list of them) from reduce_image")
        panels = images
    else:
        if not all(isinstance(item, Image.Image) for item in images):
            raise TypeError(
                f"image must be a PIL image or a list of them when result is given, got {type(images[0]).__name__}"
            )
        reductions = [row for reduction in _as_list(result) for row in _split_reduction(reduction)]
        if len(reductions) != len(images):
            raise ValueError(
                f"result holds {len(reductions)} reduced images (crops / frames) but {len(images)} image(s) were given"
            )
        panels = []
        for picture, reduction in zip(images, reductions, strict=True):
            panel_grid, prefix = _resolve_layout(reduction, grid, num_prefix_tokens)
            panels.append(ReducedImage(picture, reduction, panel_grid, prefix))
    if labels is not None:
        labels = [str(label) for label in _as_list(labels)]
        if len(labels) != len(panels):
            raise ValueError(f"labels must have one entry per panel ({len(panels)}), got {len(labels)}")
        panels = [
            ReducedImage(p.image, p.reduction, p.grid, p.num_prefix_tokens, label)
            for p, label in zip(panels, labels, strict=True)
        ]
    return panels


# --- drawing ---------------------------------------------------------------------------------


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
    panels = _as_panels(image, result, grid, num_prefix_tokens, labels)
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


# --- from a model ----------------------------------------------------------------------------


def processor_view(pixel_values: torch.Tensor, image_processor: Any = None) -> list[Image.Image]:
    """Undo the processor's rescaling and normalisation: the images exactly as the tower saw them.

    pixel_values: (images, channels, height, width). Without an image processor (or one that
    does not say how it normalised), each image is min-max scaled instead.
    """
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 4:
        raise ValueError(
            "pixel_values must be an (images, channels, height, width) tensor, got "
            f"{getattr(pixel_values, 'shape', type(pixel_values).__name__)}"
        )
    values = pixel_values.detach().float().cpu()
    mean = getattr(image_processor, "image_mean", None)
    std = getattr(image_processor, "image_std", None)
    if image_processor is not None and mean is not None and std is not None:
        if getattr(image_processor, "do_normalize", True):
            values = values * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
        if getattr(image_processor, "do_rescale", True):
            values = values / float(getattr(image_processor, "rescale_factor", 1 / 255))
    else:
        low = values.amin(dim=(1, 2, 3), keepdim=True)
        high = values.amax(dim=(1, 2, 3), keepdim=True)
        values = (values - low) / (high - low).clamp(min=1e-12) * 255
    if values.shape[1] == 1:
        values = values.expand(-1, 3, -1, -1)
    pixels = values[:, :3].round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(picture)) for picture in pixels]


def reduced_images(
    pixel_values: torch.Tensor,
    reduction: Reduction,
    patch_size: int,
    num_prefix_tokens: int,
    image_processor: Any = None,
    labels: Sequence[str] | None = None,
) -> list[ReducedImage]:
    """Pair each row of `pixel_values` (images, C, H, W) with its row of a batched `reduction`.

    labels: a caption per row; by default none for one image, "image 1", "image 2", ... for several.
    """
    views = processor_view(pixel_values, image_processor)
    rows = _split_reduction(reduction)
    if len(rows) != len(views):
        raise ValueError(f"reduction holds {len(rows)} images but pixel_values holds {len(views)}")
    patch_size = check_int("patch_size", patch_size, 1)
    grid = (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)
    if labels is None:
        labels = [f"image {index + 1}" for index in range(len(views))] if len(views) > 1 else [""]
    if len(labels) != len(views):
        raise ValueError(f"labels must have one entry per image ({len(views)}), got {len(labels)}")
    return [
        ReducedImage(view, row, grid, num_prefix_tokens, str(label))
        for view, row, label in zip(views, rows, labels, strict=True)
    ]


def _crop_labels(count: int) -> list[str]:
    # AnyRes processors (LLaVA-NeXT, OneVision) put the whole image, resized, before the grid crops.
    return ["base image"] + [f"crop {index}" for index in range(1, count)]


def model_adapter(model: nn.Module, config: VisionZipConfig | None = None, processor: Any = None) -> Any:
    """The family adapter for `model`, without patching it.

    With `config` None: the applied VisionZip's adapter when there is one, else an adapter with the
    smallest budget (1 + 0 tokens, valid for every tower) for reading the tower's geometry.
    """
    from vlmzip.adapters import adapter_class_for
    from vlmzip.api import get_state

    adapter_class = adapter_class_for(model)
    if config is None:
        state = get_state(model)
        return state.adapter if state is not None else adapter_class(model, VisionZipConfig(dominant=1, contextual=0))
    if not isinstance(config, VisionZipConfig):
        raise TypeError(f"config must be a VisionZipConfig or None, got {type(config).__name__}")
    return adapter_class(model, config, processor)  # the budget is checked at the processor's input size


def image_pixel_values(processor: Any, image: Image.Image | str | Path) -> tuple[torch.Tensor, Any, list[str] | None]:
    """(pixel_values (crops, C, H, W), image processor, crop labels or None) for one image, as the
    model's processor makes them."""
    image_processor = getattr(processor, "image_processor", processor)
    if not callable(image_processor):
        raise TypeError(f"processor must be the model's processor (or image processor), got {type(processor).__name__}")
    image = load_image(image, image_processor)
    pixel_values = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    labels = None
    if pixel_values.ndim == 5:  # (images, crops, C, H, W): each crop is reduced on its own
        pixel_values = pixel_values.flatten(0, 1)
        labels = _crop_labels(pixel_values.shape[0]) if pixel_values.shape[0] > 1 else None
    return pixel_values, image_processor, labels


def reduced_images_for(
    model: nn.Module, processor: Any, image: Image.Image | str | Path, reduction: Reduction
) -> list[ReducedImage]:
    """Pair a reduction `model` made of `image` (e.g. `vlmzip.demo.run_demo(...).reduction`) with the
    processor's view of that image, ready for `visualize`."""
    adapter = model_adapter(model)
    pixel_values, image_processor, labels = image_pixel_values(processor, image)
    labels = adapter.unit_labels(pixel_values.shape[0]) or labels
    # Tokens before the grid ([CLS]): none where the reduced tokens are pooled or shuffled units (InternVL).
    cells = (pixel_values.shape[-2] // adapter.token_pixels) * (pixel_values.shape[-1] // adapter.token_pixels)
    prefix = int(reduction.groups.shape[1]) - cells
    return reduced_images(pixel_values, reduction, adapter.token_pixels, prefix, image_processor, labels)


def reduce_image(
    model: nn.Module,
    processor: Any,
    image: Image.Image | str | Path,
    config: VisionZipConfig | None = None,
) -> list[ReducedImage]:
    """Run `model`'s vision tower on one image and reduce it as VisionZip would inside the model.

    Works on a model with VisionZip applied (its config is used unless `config` is given) and on
    any supported model without it (`config` defaults to `VisionZipConfig()`, 54 + 10). Uses the
    model's own feature layer and never patches the model. Returns one `ReducedImage` per crop /
    frame the processor made (one for LLaVA-1.5), ready for `visualize(...)`.
    """
    from vlmzip.adapters import adapter_class_for
    from vlmzip.api import is_applied

    adapter_class_for(model)  # unsupported models get that error first
    if config is None and not is_applied(model):
        config = VisionZipConfig()
    adapter = model_adapter(model, config, processor)
    if hasattr(adapter, "reduce_for_view"):  # towers fed flattened patches (Qwen): the adapter rebuilds the view
        image_processor = getattr(processor, "image_processor", processor)
        processed = image_processor(images=[load_image(image, image_processor)], return_tensors="pt")
        with torch.no_grad():
            pixel_values, reduction, unit = adapter.reduce_for_view(processed)
        return reduced_images(pixel_values, reduction, unit, 0, image_processor)
    pixel_values, image_processor, labels = image_pixel_values(processor, image)
    parameter = next(adapter.vision_tower().parameters())
    with torch.no_grad():
        probe, reduction = adapter.reduce(pixel_values.to(device=parameter.device, dtype=parameter.dtype))
    if isinstance(reduction, list):  # an adaptive budget: one reduction per image or crop, of its own length
        if len(reduction) != 1:
            raise ValueError(f"drawing an adaptive budget covers single-crop images, got {len(reduction)} crops")
        reduction = reduction[0]
    labels = adapter.unit_labels(pixel_values.shape[0]) or labels
    return reduced_images(
        pixel_values, reduction, adapter.token_pixels, probe.num_prefix_tokens, image_processor, labels
    )
