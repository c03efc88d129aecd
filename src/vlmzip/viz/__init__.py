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

The package keeps the two apart: `panels` (ReducedImage: what gets drawn), `draw` (PIL and numpy
only: panels, heatmaps, legend, `visualize`) and `model` (running the model's tower through its
adapter to get what to draw).
"""

from __future__ import annotations

from vlmzip.viz.draw import (
    BACKGROUND,
    CAPTION_HEIGHT,
    CONTEXTUAL_ALPHA,
    DEFAULT_COLUMNS,
    DOMINANT_OUTLINE,
    DROPPED_BRIGHTNESS,
    GAP,
    HEATMAP_ALPHA,
    LEGEND_ROW_HEIGHT,
    MARGIN,
    MAX_LEGEND_GROUPS,
    MIN_CELL,
    PANEL_SIZE,
    SWATCH,
    TEXT_COLOR,
    TITLE_HEIGHT,
    check_output_path,
    group_colors,
    heat_colors,
    visualize,
)
from vlmzip.viz.model import (
    image_pixel_values,
    model_adapter,
    processor_view,
    reduce_image,
    reduced_images,
    reduced_images_for,
)
from vlmzip.viz.panels import (
    ReducedImage,
    token_summary,
)

__all__ = [
    "BACKGROUND",
    "CAPTION_HEIGHT",
    "CONTEXTUAL_ALPHA",
    "DEFAULT_COLUMNS",
    "DOMINANT_OUTLINE",
    "DROPPED_BRIGHTNESS",
    "GAP",
    "HEATMAP_ALPHA",
    "LEGEND_ROW_HEIGHT",
    "MARGIN",
    "MAX_LEGEND_GROUPS",
    "MIN_CELL",
    "PANEL_SIZE",
    "SWATCH",
    "TEXT_COLOR",
    "TITLE_HEIGHT",
    "ReducedImage",
    "check_output_path",
    "group_colors",
    "heat_colors",
    "image_pixel_values",
    "model_adapter",
    "processor_view",
    "reduce_image",
    "reduced_images",
    "reduced_images_for",
    "token_summary",
    "visualize",
]
