"""vlmzip.load_image: every mode reads as its 8-bit RGB picture; no accepted image can blow up memory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vlmzip
from conftest import make_llava_processor, make_qwen_processor
from families import make_llava_next_processor, make_mistral3_processor, make_onevision_processor
from vlmzip import images
from vlmzip.images import load_image, processed_sizes
from vlmzip.viz import image_pixel_values

SRC = Path(__file__).resolve().parents[1] / "src" / "vlmzip"


def picture(seed: int = 0, size: tuple[int, int] = (40, 30)) -> np.ndarray:
    """(height, width, 3) uint8 RGB with every value and a few flat regions."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    pixels[:4] = 0
    pixels[-4:] = 255
    return pixels


def gray() -> np.ndarray:
    return np.asarray(Image.fromarray(picture()).convert("L"))


def as_array(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def gray_rgb() -> np.ndarray:
    return as_array(Image.fromarray(gray()).convert("RGB"))


# --- defect: 16-bit and other modes ---------------------------------------------------------------
def variants(tmp_path: Path) -> dict[str, tuple[object, np.ndarray]]:
    """mode name -> (image or file path, the RGB picture it must read as)."""
    g = gray()
    rgb = picture()
    out: dict[str, tuple[object, np.ndarray]] = {}
    sixteen = tmp_path / "gray16.png"
    Image.fromarray(g.astype(np.uint16) * 257).save(sixteen)
    out["I;16 png"] = (sixteen, gray_rgb())
    out["I;16B"] = (Image.fromarray(g.astype(np.uint16) * 257).convert("I").convert("I;16B"), gray_rgb())
    out["I 16-bit range"] = (Image.fromarray(g.astype(np.int32) * 257), gray_rgb())
    out["I 8-bit range"] = (Image.fromarray(g).convert("I"), gray_rgb())
    out["F 0..1"] = (Image.fromarray(g.astype(np.float32) / 255), gray_rgb())
    out["F 0..255"] = (Image.fromarray(g).convert("F"), gray_rgb())
    tiff = tmp_path / "float.tiff"
    Image.fromarray(g.astype(np.float32) / 255).save(tiff)
    out["F tiff"] = (tiff, gray_rgb())
    palette = Image.fromarray(rgb).quantize(64)
    out["P"] = (palette, as_array(palette.convert("RGB")))
    transparent = palette.copy()
    transparent.info["transparency"] = 0
    expected = as_array(palette.convert("RGB")).copy()
    expected[np.asarray(palette) == 0] = 255  # transparent pixels over white
    out["P transparency"] = (transparent, expected)
    p_path = tmp_path / "palette_transparent.png"
    transparent.save(p_path, transparency=0)
    out["P transparency png"] = (p_path, expected)
    la = Image.fromarray(g).convert("LA")
    out["LA"] = (la, gray_rgb())
    half = np.dstack([g, np.where(np.arange(g.shape[1]) % 2 == 0, 255, 0).astype(np.uint8)[None].repeat(g.shape[0], 0)])
    expected_half = np.where(half[..., 1:] == 255, g[..., None], 255).repeat(3, axis=2).astype(np.uint8)
    out["LA half transparent"] = (Image.fromarray(half, "LA"), expected_half)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    out["RGBA opaque"] = (Image.fromarray(rgba), rgb)
    cmyk = tmp_path / "cmyk.tiff"
    Image.fromarray(rgb).convert("CMYK").save(cmyk)
    out["CMYK tiff"] = (cmyk, rgb)
    out["1"] = (Image.fromarray(g > 127), as_array(Image.fromarray(((g > 127) * 255).astype(np.uint8)).convert("RGB")))
    rotated = tmp_path / "rotated.png"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_90).save(rotated, exif=exif)
    out["EXIF orientation 6"] = (rotated, rgb)
    return out


def test_every_mode_reads_as_its_8bit_rgb_picture(tmp_path):
    for name, (source, expected) in variants(tmp_path).items():
        loaded = load_image(source)
        assert loaded.mode == "RGB", name
        np.testing.assert_array_equal(as_array(loaded), expected, err_msg=name)


def test_16bit_png_is_not_solid_white_in_the_processor(tmp_path):
    """The old loader's convert('RGB') clipped 16-bit values: every pixel became 255."""
    sixteen = tmp_path / "gray16.png"
    Image.fromarray(gray().astype(np.uint16) * 257).save(sixteen)
    eight = tmp_path / "gray8.png"
    Image.fromarray(gray()).save(eight)
    processor = make_llava_processor()
    from_16, _, _ = image_pixel_values(processor, sixteen)
    from_8, _, _ = image_pixel_values(processor, eight)
    assert float(from_16.std()) > 0.1
    assert np.array_equal(from_16.numpy(), from_8.numpy())


def test_float_images_with_nan_are_refused():
    values = np.zeros((8, 8), np.float32)
    values[2, 3] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        load_image(Image.fromarray(values))


def test_load_image_is_public_and_refuses_other_types():
    assert vlmzip.load_image is load_image
    with pytest.raises(TypeError, match="PIL image or a path"):
        load_image(np.zeros((4, 4, 3), np.uint8))


def test_no_entry_point_opens_or_converts_images_itself():
    """Every entry point reads images through vlmzip.images, so the rules above hold everywhere."""
    offenders = []
    for path in SRC.rglob("*.py"):
        if path.name == "images.py":
            continue
        text = path.read_text(encoding="utf-8")
        for pattern in (r"Image\.open\(", r"\.convert\(\s*[\"']RGB[\"']\s*\)"):
            if re.search(pattern, text):
                offenders.append(f"{path.relative_to(SRC)}: {pattern}")
    assert not offenders, offenders


# --- defect: memory from tiny files with extreme aspect ratios -------------------------------------
def test_extreme_aspect_ratio_is_refused_before_the_processor_runs(tmp_path):
    path = tmp_path / "strip.png"
    Image.new("RGB", (20000, 2), (120, 30, 200)).save(path)
    assert path.stat().st_size < 2000
    load_image(path)  # 40,000 pixels: fine on its own
    with pytest.raises(ValueError, match=r"3360000x336 .* \(limit 25000000\)"):
        load_image(path, make_llava_processor())
    with pytest.raises(ValueError, match="aspect ratio of 10000:1.*at most 200:1"):
        load_image(path, make_qwen_processor())
    with pytest.raises(ValueError, match="limit 25000000"):
        image_pixel_values(make_llava_processor(), path)


@pytest.mark.parametrize("size", [(20000, 2), (2, 20000), (5000, 3), (900, 900), (336, 10)])
def test_processed_sizes_are_bounded_for_every_family(size):
    width, height = size
    llava = processed_sizes(make_llava_processor(), height, width)
    assert llava == [(336 * height // min(size), 336 * width // min(size))]
    for processor in (make_llava_next_processor(), make_onevision_processor()):
        sizes = processed_sizes(processor, height, width)
        pinpoints = processor.image_processor.image_grid_pinpoints
        largest = max(h * w for h, w in pinpoints)
        assert all(h * w <= max(largest, max(size) ** 2) for h, w in sizes)


def test_pixtral_size_matches_the_processor_and_a_sliver_is_refused_by_name():
    processor = make_mistral3_processor()  # longest side 128 px, 8 px patches
    for width, height in [(300, 400), (100, 60), (40, 90), (1, 1), (200, 2), (2, 128), (500, 20)]:
        image = Image.new("RGB", (width, height), (10, 200, 30))
        pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        assert processed_sizes(processor, height, width) == [tuple(pixels.shape[-2:])], (width, height)
    # Scaled to 128 px, a 2 px side rounds to 0: the processor fails on a zero size without naming the image.
    for width, height in [(2, 2000), (2000, 2), (337, 1)]:
        with pytest.raises(ValueError, match=rf"image {width}x{height} has an aspect ratio of \d+:1.*at most 128:1"):
            load_image(Image.new("RGB", (width, height)), processor)


def test_qwen_size_matches_the_processor():
    processor = make_qwen_processor()
    for width, height in [(300, 400), (56, 56), (1000, 30), (20, 3000), (999, 997)]:
        image = Image.new("RGB", (width, height), (10, 200, 30))
        grid = processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"][0].tolist()
        (h, w) = processed_sizes(processor, height, width)[0]
        assert [1, h // 14, w // 14] == grid, (width, height)


MEASURE = """
import resource, sys
sys.path[:0] = {paths!r}
from PIL import Image
from conftest import make_llava_processor
from vlmzip.images import load_image
processor = make_llava_processor()
image = Image.new("RGB", ({width}, {height}), (120, 30, 200))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
image = load_image(image, processor)
processor(images=[image], text=["<image> hi"], return_tensors="pt")
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_the_most_extreme_accepted_image_stays_well_under_a_gigabyte():
    """400 x 2 is accepted (resized to 67200 x 336 = 22.6 megapixels); its processing rise stays < 1 GB."""
    width, height = 400, 2
    assert images.processed_pixels(make_llava_processor(), height, width) <= images.MAX_PROCESSED_PIXELS
    tests = str(Path(__file__).resolve().parent)
    code = MEASURE.format(paths=[tests, str(SRC.parent)], width=width, height=height)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    rise_mb = float(result.stdout.strip().splitlines()[-1])
    assert rise_mb < 1024, rise_mb
