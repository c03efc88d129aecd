"""Reading images: one function for every entry point, so every file reads alike and none can exhaust memory.

`load_image(path_or_pil, processor=None)` returns an 8-bit RGB PIL image that shows the same
picture as the file, whatever its mode:

- EXIF orientation is applied (the picture as a viewer shows it);
- 16-bit grayscale (`I;16`, `I;16B`, ...) is scaled to 8 bits (65535 -> 255), not clipped;
- 32-bit `I` and `F` are read by their value range: [0, 255] as 8-bit values, [0, 65535] as
  16-bit values, `F` in [0, 1] as fractions; any other range is stretched linearly to [0, 255].
  `F` images holding NaN or infinity are refused;
- transparency (`RGBA`, `LA`, `PA`, `P` or `L`/`RGB` with a transparent colour) is composited onto
  white, as transformers' own `convert_to_rgb` does;
- every other mode Pillow can convert (`P`, `L`, `1`, `CMYK`, `YCbCr`, ...) goes through
  `Image.convert("RGB")`.

Size limits: an image is refused (ValueError naming the limit) when it has more than
`MAX_IMAGE_PIXELS` pixels, or, given the model's processor, when the processor's resize would make
an image of more than `MAX_PROCESSED_PIXELS` pixels. The second check is what a tiny file with an
extreme aspect ratio needs: a 20000 x 2 image has only 40,000 pixels, but a shortest-edge resize
to 336 px turns it into 3,360,000 x 336 (over a billion pixels).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Decoded pixels at most: larger images are almost always a mistake and cost memory before any resize.
MAX_IMAGE_PIXELS = 50_000_000
# The largest image a processor's resize (or padding) may produce from an accepted image. Resizing
# costs about 10 bytes per output pixel on CPU (measured with the embedded model's processor: a
# 113-megapixel resize raised peak memory by 1.08 GB), so this keeps the rise near 250 MB.
MAX_PROCESSED_PIXELS = 25_000_000
# Qwen's smart_resize refuses more extreme aspect ratios; said before the processor says it.
QWEN_MAX_ASPECT_RATIO = 200

ORIENTATION_TAG = 0x0112  # EXIF
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def load_image(
    image: str | Path | Image.Image,
    processor: Any = None,
    *,
    max_pixels: int | None = None,
) -> Image.Image:
    """An image file (or PIL image) as the 8-bit RGB picture it shows, or a ValueError naming the problem.

    processor: the model's processor (or image processor). When given, the image is also refused
    when the processor's resize would make more than `MAX_PROCESSED_PIXELS` pixels of it (see
    `processed_pixels`). max_pixels: decoded pixels at most (default `MAX_IMAGE_PIXELS`).
    Raises FileNotFoundError for a missing file, TypeError for other inputs.
    """
    max_pixels = MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    if isinstance(image, (str, Path)):
        rgb = _read_file(Path(image), max_pixels)
    elif isinstance(image, Image.Image):
        _check_pixels(image.size, max_pixels, "")
        rgb = to_rgb(image)
    else:
        raise TypeError(f"image must be a PIL image or a path to one, got {type(image).__name__}")
    if processor is not None:
        check_processed_size(rgb.size, processor)
    return rgb


def _check_pixels(size: tuple[int, int], max_pixels: int, where: str) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"image is empty ({width}x{height} pixels){where}")
    if width * height > max_pixels:
        raise ValueError(f"image too large: {width}x{height} = {width * height} pixels (limit {max_pixels}){where}")


def _read_file(path: Path, max_pixels: int) -> Image.Image:
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ValueError(f"image path is not a file: {path}")
    try:
        with Image.open(path) as probe:
            _check_pixels(probe.size, max_pixels, f": {path}")
            probe.verify()
        with Image.open(path) as opened:
            opened.load()
            return to_rgb(opened)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ValueError(f"not a readable image file: {path}") from None
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    except ValueError as error:
        if str(path) in str(error):
            raise
        raise ValueError(f"{error}: {path}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB showing the same picture (orientation, bit depth and transparency handled)."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL image, got {type(image).__name__}")
    if image.getexif().get(ORIENTATION_TAG, 1) != 1:
        image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        return Image.fromarray(_to_8bit(np.asarray(image), mode), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in image.info:
        try:
            rgba = image.convert("RGBA")
        except ValueError:  # e.g. "La": premultiplied grey with alpha
            rgba = image.convert("LA" if mode == "La" else "RGBa").convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode == "RGB":
        return image.copy()
    try:
        return image.convert("RGB")
    except ValueError:
        raise ValueError(f"unsupported image mode {mode!r}; convert the image to RGB first") from None


def _to_8bit(values: np.ndarray, mode: str) -> np.ndarray:
    """One-channel integer or float pixels as uint8, by the range rules in the module docstring."""
    values = values.astype(np.float64)
    if not np.isfinite(values).all():
        raise ValueError(f"image of mode {mode!r} holds NaN or infinite pixel values")
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode in _SIXTEEN_BIT_MODES:
        scaled = values / 257.0
    elif low >= 0 and high <= 1 and mode == "F":
        scaled = values * 255.0
    elif low >= 0 and high <= 255:
        scaled = values
    elif low >= 0 and high <= 65535:
        scaled = values / 257.0
    else:
        scaled = (values - low) / (high - low) * 255.0
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


# --- what the processor makes of an image --------------------------------------------------------
def _size_value(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, Mapping) else getattr(size, key, None)
    return int(value) if isinstance(value, (int, float)) and value else None


def processed_sizes(processor: Any, height: int, width: int) -> list[tuple[int, int]]:
    """(height, width) of every image the processor's resizing and padding make of a `height` x `width` image.

    Knows the resize rules of the supported families' image processors: Qwen2-VL's `smart_resize`
    (min/max pixels, aspect ratio at most 200), LLaVA-NeXT / OneVision AnyRes (best grid pinpoint,
    base crop, OneVision's square padding of images in multi-image prompts) and the generic size
    rules (shortest edge keeping the aspect ratio, with or without a longest edge; Pixtral's longest
    edge rounded up to whole patches; fixed height and width; max height and width). Raises
    ValueError when the processor would refuse the image.
    """
    image_processor = getattr(processor, "image_processor", processor)
    size = getattr(image_processor, "size", None)
    sizes: list[tuple[int, int]] = []
    if getattr(image_processor, "merge_size", None) and getattr(image_processor, "temporal_patch_size", None):
        return [_qwen_size(image_processor, height, width)]
    pinpoints = getattr(image_processor, "image_grid_pinpoints", None)
    if pinpoints:
        sizes.append(max(((int(h), int(w)) for h, w in pinpoints), key=lambda hw: hw[0] * hw[1]))
        if hasattr(image_processor, "pad_to_square"):  # OneVision pads multi-image prompts' images to squares
            side = max(height, width)
            sizes.append((side, side))
    if size is None:
        return sizes
    shortest, longest = _size_value(size, "shortest_edge"), _size_value(size, "longest_edge")
    fixed_h, fixed_w = _size_value(size, "height"), _size_value(size, "width")
    max_h, max_w = _size_value(size, "max_height"), _size_value(size, "max_width")
    if pinpoints:
        side = shortest or fixed_h or 0
        sizes.append((fixed_h or side, fixed_w or side))  # the base crop
    elif longest and not shortest and getattr(image_processor, "patch_size", None) is not None:
        sizes.append(_pixtral_size(image_processor.patch_size, longest, height, width))
    elif shortest:
        scale = shortest / min(height, width)
        if longest and max(height, width) * scale > longest:
            scale = longest / max(height, width)
        sizes.append((max(1, int(height * scale)), max(1, int(width * scale))))
    elif fixed_h and fixed_w:
        sizes.append((fixed_h, fixed_w))
    elif max_h and max_w:
        scale = min(max_h / height, max_w / width)
        sizes.append((max(1, int(height * scale)), max(1, int(width * scale))))
    return sizes


def _qwen_size(image_processor: Any, height: int, width: int) -> tuple[int, int]:
    ratio = max(height, width) / min(height, width)
    if ratio > QWEN_MAX_ASPECT_RATIO:
        raise ValueError(
            f"image {width}x{height} has an aspect ratio of {ratio:.0f}:1; this model's processor "
            f"accepts at most {QWEN_MAX_ASPECT_RATIO}:1"
        )
    size = getattr(image_processor, "size", None)
    min_pixels = _size_value(size, "shortest_edge") or int(getattr(image_processor, "min_pixels", 56 * 56))
    max_pixels = _size_value(size, "longest_edge") or int(getattr(image_processor, "max_pixels", 28 * 28 * 1280))
    factor = int(image_processor.patch_size) * int(image_processor.merge_size)
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def _pixtral_size(patch: Any, longest: int, height: int, width: int) -> tuple[int, int]:
    """Pixtral's resize: the longest side down to `longest` px (rounded down), then up to whole patches."""
    patch_h, patch_w = (
        (patch, patch) if isinstance(patch, int) else (_size_value(patch, "height"), _size_value(patch, "width"))
    )
    ratio = max(height, width) / longest
    new_h, new_w = (math.floor(height / ratio), math.floor(width / ratio)) if ratio > 1 else (height, width)
    if not new_h or not new_w:
        raise ValueError(
            f"image {width}x{height} has an aspect ratio of {max(height, width) / min(height, width):.0f}:1; this "
            f"model's processor scales its longest side to {longest} px, which leaves its shortest side under 1 px "
            f"(at most {longest}:1); crop or pad the image closer to square"
        )
    return math.ceil(new_h / (patch_h or 1)) * (patch_h or 1), math.ceil(new_w / (patch_w or 1)) * (patch_w or 1)


def processed_pixels(processor: Any, height: int, width: int) -> int:
    """Pixels of the largest image the processor makes of a `height` x `width` image (0 when unknown)."""
    return max((h * w for h, w in processed_sizes(processor, height, width)), default=0)


def check_processed_size(size: tuple[int, int], processor: Any, *, limit: int | None = None) -> None:
    """Refuse a (width, height) image that the processor would blow up beyond `limit` pixels (default
    `MAX_PROCESSED_PIXELS`)."""
    limit = MAX_PROCESSED_PIXELS if limit is None else limit
    width, height = size
    largest = max(processed_sizes(processor, height, width), key=lambda hw: hw[0] * hw[1], default=(height, width))
    if largest[0] * largest[1] > limit:
        raise ValueError(
            f"image {width}x{height} would become {largest[1]}x{largest[0]} = {largest[0] * largest[1]} pixels "
            f"in the model's processor (limit {limit}): its aspect ratio is too extreme for this model; "
            "crop or pad the image closer to square"
        )


# --- the input geometry a processor gives the tower ---------------------------------------------------
def image_processor_settings(source: Any) -> Any:
    """The image processor of `source` (a processor, an image processor, or a model directory holding
    `processor_config.json` / `preprocessor_config.json`), as an object or a dict; None when there is none."""
    if isinstance(source, (str, Path)):
        directory = Path(source)
        if not directory.is_dir():
            return None
        for name, key in (("preprocessor_config.json", None), ("processor_config.json", "image_processor")):
            try:
                data = json.loads((directory / name).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            data = data.get(key) if key and isinstance(data, dict) else data
            if isinstance(data, dict):
                return data
        return None
    return getattr(source, "image_processor", source) if source is not None else None


def _setting(settings: Any, key: str, default: Any = None) -> Any:
    if isinstance(settings, Mapping):
        return settings.get(key, default)
    return getattr(settings, key, default)


def processor_input_size(source: Any) -> tuple[int, int] | None:
    """(height, width) of every image (or crop) the processor hands the tower, when it is fixed.

    The centre-crop size when the processor crops, else a fixed resize size; None for processors
    whose output size depends on the image (Qwen's dynamic resolution) or that are unknown.
    """
    settings = image_processor_settings(source)
    if settings is None or _setting(settings, "merge_size"):
        return None
    crop = _setting(settings, "crop_size")
    if _setting(settings, "do_center_crop", False) and crop is not None:
        height, width = _size_value(crop, "height"), _size_value(crop, "width")
        if height and width:
            return height, width
    size = _setting(settings, "size")
    height, width = _size_value(size, "height"), _size_value(size, "width")
    return (height, width) if height and width else None


def processor_max_units(source: Any) -> int | None:
    """Most merged tokens one image can yield under a Qwen-style processor (None when not one, or unknown)."""
    settings = image_processor_settings(source)
    merge, patch = _setting(settings, "merge_size"), _setting(settings, "patch_size")
    if settings is None or not merge or not patch:
        return None
    max_pixels = _size_value(_setting(settings, "size"), "longest_edge") or _setting(settings, "max_pixels")
    if not isinstance(max_pixels, (int, float)) or max_pixels <= 0:
        return None
    factor = int(patch) * int(merge)
    return max(1, int(max_pixels) // (factor * factor))
