"""visualize / reduce_image / `vlmzip show`: pixels checked patch by patch on plain images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import vlmzip
from conftest import make_llava, make_llava_processor, random_images
from vlmzip.cli import main
from vlmzip.core import GROUP_DOMINANT, GROUP_DROPPED, Reduction
from vlmzip.viz import (
    CONTEXTUAL_ALPHA,
    DOMINANT_OUTLINE,
    MARGIN,
    ReducedImage,
    group_colors,
    processor_view,
    reduce_image,
    token_summary,
    visualize,
)

GREY = (128, 128, 128)


def plain(size=(400, 300), color=GREY) -> Image.Image:
    return Image.new("RGB", size, color)


def synthetic_reduction(grid=(6, 8), kept_patches=(0, 1, 9, 20, 47), contextual=3, dropped=(5, 6), batch=1):
    """A hand-made Reduction: [CLS] + the given patches kept, `dropped` patches dropped, the rest in groups."""
    rows, cols = grid
    num_tokens = 1 + rows * cols
    groups = torch.full((batch, num_tokens), GROUP_DOMINANT, dtype=torch.long)
    rest = [p for p in range(rows * cols) if p not in kept_patches and p not in dropped]
    for position, patch in enumerate(rest):
        groups[:, 1 + patch] = position % contextual
    for patch in dropped:
        groups[:, 1 + patch] = GROUP_DROPPED
    kept = torch.tensor([0] + [1 + p for p in kept_patches]).expand(batch, -1)
    dominant = kept.shape[1]
    scores = torch.arange(rows * cols, dtype=torch.float32).expand(batch, -1).clone()
    return Reduction(
        features=torch.zeros(batch, dominant + contextual, 4), kept_indices=kept, groups=groups, scores=scores
    )


def cell_centers(picture: Image.Image, box, grid) -> np.ndarray:
    """(rows, cols, 3) colour at the centre of each patch cell inside `box`."""
    x0, y0, x1, y1 = box
    rows, cols = grid
    cell = (x1 - x0) // cols
    pixels = np.asarray(picture)
    ys = y0 + np.arange(rows) * cell + cell // 2
    xs = x0 + np.arange(cols) * cell + cell // 2
    return pixels[ys][:, xs]


def expected_tint(color) -> np.ndarray:
    return np.round(np.array(GREY) * (1 - CONTEXTUAL_ALPHA) + np.array(color) * CONTEXTUAL_ALPHA)


def test_panel_geometry_and_output_size():
    picture = visualize(plain(), synthetic_reduction(), grid=(6, 8), num_prefix_tokens=1)
    (panel,) = picture.info["visionzip_panels"]
    cell = 336 // 8
    x0, y0, x1, y1 = panel["tokens"]
    assert (x1 - x0, y1 - y0) == (8 * cell, 6 * cell) and panel["cell"] == cell and panel["heatmap"] is None
    assert picture.mode == "RGB"
    assert picture.width == 2 * MARGIN + 8 * cell  # one panel, no heatmap: panel plus margins
    assert y1 < picture.height  # title above, legend below


def test_highlighted_patches_equal_the_kept_ones_and_each_group_has_its_colour():
    reduction = synthetic_reduction()
    picture = visualize(plain(), reduction, grid=(6, 8), num_prefix_tokens=1)
    (panel,) = picture.info["visionzip_panels"]
    centers = cell_centers(picture, panel["tokens"], (6, 8)).astype(int)
    groups = reduction.groups[0, 1:].view(6, 8).numpy()

    untouched = (centers == GREY).all(axis=-1)
    assert untouched.sum() == reduction.kept_indices.shape[1] - 1  # [CLS] is kept but has no cell
    assert np.array_equal(untouched, groups == GROUP_DOMINANT)
    colors = group_colors(3)
    assert len(set(colors)) == 3
    for group, color in enumerate(colors):
        np.testing.assert_allclose(
            centers[groups == group], np.broadcast_to(expected_tint(color), centers[groups == group].shape), atol=1
        )
    dropped = centers[groups == GROUP_DROPPED]
    assert len(dropped) == 2 and (dropped < 40).all()


def test_dominant_region_is_outlined():
    picture = visualize(plain(), synthetic_reduction(kept_patches=(9,)), grid=(6, 8), num_prefix_tokens=1)
    (panel,) = picture.info["visionzip_panels"]
    x0, y0 = panel["tokens"][:2]
    cell = panel["cell"]
    left, top = x0 + 1 * cell, y0 + 1 * cell  # patch 9 = row 1, col 1
    pixels = np.asarray(picture)
    assert tuple(pixels[top, left + cell // 2]) == DOMINANT_OUTLINE  # top edge
    assert tuple(pixels[top + cell // 2, left + cell - 1]) == DOMINANT_OUTLINE  # right edge
    assert tuple(pixels[top + cell // 2, left + cell // 2]) == GREY  # the patch itself untouched


def test_heatmap_panel_beside_the_tokens():
    reduction = synthetic_reduction()
    without = visualize(plain(), reduction, grid=(6, 8), num_prefix_tokens=1)
    picture = visualize(plain(), reduction, grid=(6, 8), num_prefix_tokens=1, heatmap=True)
    (panel,) = picture.info["visionzip_panels"]
    tokens, heat = panel["tokens"], panel["heatmap"]
    assert heat[0] > tokens[2] and heat[1] == tokens[1]
    assert (heat[2] - heat[0], heat[3] - heat[1]) == (tokens[2] - tokens[0], tokens[3] - tokens[1])
    assert picture.width > without.width
    brightness = cell_centers(picture, heat, (6, 8)).astype(int).sum(axis=-1)
    assert brightness[-1, -1] > brightness[3, 0] > brightness[0, 0]  # scores rise with the patch index


def test_heatmap_needs_scores():
    reduction = synthetic_reduction()
    reduction.scores = None
    with pytest.raises(ValueError, match="scores"):
        visualize(plain(), reduction, grid=(6, 8), num_prefix_tokens=1, heatmap=True)


def test_multi_panel_one_per_crop():
    reduction = synthetic_reduction(batch=5)
    picture = visualize(
        [plain()] * 5, reduction, grid=(6, 8), num_prefix_tokens=1, labels=[f"crop {i}" for i in range(5)]
    )
    boxes = [panel["tokens"] for panel in picture.info["visionzip_panels"]]
    assert len(boxes) == 5
    assert len({box[1] for box in boxes}) == 2  # 5 panels: balanced rows of 3 + 2
    for first, second in zip(boxes, boxes[1:], strict=False):
        assert first[2] <= second[0] or first[3] <= second[1]  # no overlap
    for box in boxes:
        centers = cell_centers(picture, box, (6, 8))
        assert (centers == GREY).all(axis=-1).sum() == 5
    assert (
        token_summary([ReducedImage(plain(), row, (6, 8), 1) for row in [synthetic_reduction()] * 5])
        == "45 of 245 tokens over 5 panels: 30 dominant + 15 contextual"
    )
    as_list = visualize([plain()] * 2, [synthetic_reduction(), synthetic_reduction()], grid=(6, 8), num_prefix_tokens=1)
    assert len(as_list.info["visionzip_panels"]) == 2


def test_input_errors():
    reduction = synthetic_reduction()
    with pytest.raises(ValueError, match="2 image"):
        visualize([plain(), plain()], reduction, grid=(6, 8), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="does not match"):
        visualize(plain(), reduction, grid=(6, 6), num_prefix_tokens=1)
    with pytest.raises(ValueError, match="grid"):
        visualize(plain(), reduction)  # 48 patches: not a square, cannot be inferred
    with pytest.raises(TypeError, match="result is required"):
        visualize(plain())
    with pytest.raises(TypeError, match="Reduction"):
        visualize(plain(), "not a reduction")
    with pytest.raises(ValueError, match="panel_size"):
        visualize(plain(), reduction, grid=(6, 8), panel_size=2)
    with pytest.raises(ValueError, match="labels"):
        visualize(plain(), reduction, grid=(6, 8), labels=["a", "b"])


def test_compress_vision_result_on_a_real_tower(clip_tower, tmp_path):
    pixel_values = torch.zeros(1, 3, 336, 336)
    result = vlmzip.compress_vision(clip_tower, pixel_values, 54, 10)
    out = tmp_path / "kept.png"
    picture = vlmzip.visualize(plain(), result, save=out)  # 24x24 grid and [CLS] inferred
    assert Image.open(out).size == picture.size
    (panel,) = picture.info["visionzip_panels"]
    assert panel["grid"] == (24, 24) and panel["cell"] == 14
    untouched = (cell_centers(picture, panel["tokens"], (24, 24)) == GREY).all(axis=-1)
    assert untouched.sum() == 53
    kept_patches = result.kept_indices[0, 1:] - 1
    assert untouched.reshape(-1)[kept_patches.numpy()].all()
    with pytest.raises(ValueError, match="unknown image format"):
        vlmzip.visualize(plain(), result, save=tmp_path / "kept.txt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vlmzip.visualize(plain(), result, save=tmp_path / "missing" / "kept.png")


def test_dinov2_tower_grid_is_inferred(dinov2_tower):
    result = vlmzip.compress_vision(dinov2_tower, torch.zeros(1, 3, 224, 224), 20, 4)
    picture = visualize(plain(), result, heatmap=True)
    (panel,) = picture.info["visionzip_panels"]
    assert panel["grid"] == (16, 16) and panel["cell"] == 336 // 16
    assert (cell_centers(picture, panel["tokens"], (16, 16)) == GREY).all(axis=-1).sum() == 19


def test_pool_method_tints_every_patch(clip_tower):
    result = vlmzip.compress_vision(clip_tower, torch.zeros(1, 3, 336, 336), 54, 10, method="pool")
    picture = visualize(plain(), result)
    (panel,) = picture.info["visionzip_panels"]
    centers = cell_centers(picture, panel["tokens"], (24, 24)).reshape(-1, 3)
    assert not (centers == GREY).all(axis=-1).any()
    assert len({tuple(c) for c in centers}) == 64  # one colour per pooled cell


@pytest.fixture(scope="module")
def tiny():
    return make_llava(), make_llava_processor()


def test_reduce_image_matches_compress_vision(tiny):
    model, processor = tiny
    image = random_images(1)[0]
    (panel,) = reduce_image(model, processor, image, vlmzip.VisionZipConfig(dominant=20, contextual=4))
    assert panel.grid == (24, 24) and panel.num_prefix_tokens == 1 and panel.image.size == (336, 336)
    pixel_values = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = vlmzip.compress_vision(model.model.vision_tower, pixel_values, 20, 4)
    assert torch.equal(panel.reduction.kept_indices, expected.kept_indices)
    assert (panel.dominant, panel.contextual, panel.total_tokens) == (20, 4, 577)
    # The panel's picture is what the tower saw: processing it again gives the same pixel values.
    again = processor.image_processor(images=[panel.image], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(again, pixel_values, atol=0.02, rtol=0)


def test_reduce_image_uses_the_applied_config(tiny):
    model, processor = tiny
    vlmzip.apply(model, dominant=30, contextual=2)
    try:
        (panel,) = reduce_image(model, processor, random_images(1)[0])
    finally:
        vlmzip.remove(model)
    assert (panel.dominant, panel.contextual) == (30, 2)
    (default,) = reduce_image(model, processor, random_images(1)[0])
    assert (default.dominant, default.contextual) == (54, 10)
    with pytest.raises(ValueError, match="dominant \\+ contextual must be <= 576"):
        reduce_image(model, processor, random_images(1)[0], vlmzip.VisionZipConfig(dominant=600, contextual=0))
    with pytest.raises(ValueError, match="unsupported model family"):
        reduce_image(torch.nn.Linear(2, 2), processor, random_images(1)[0])


def test_reduce_image_one_panel_per_crop():
    from families import make_llava_next, make_llava_next_processor

    model, processor = make_llava_next(), make_llava_next_processor()
    config = vlmzip.VisionZipConfig(dominant=20, contextual=4)
    panels = reduce_image(model, processor, random_images(1, size=(300, 500))[0], config)
    assert [p.label for p in panels] == ["base image", "crop 1", "crop 2"]
    assert all(p.grid == (24, 24) and (p.dominant, p.contextual) == (20, 4) for p in panels)
    picture = visualize(panels, heatmap=True)
    boxes = picture.info["visionzip_panels"]
    assert [box["label"] for box in boxes] == ["base image", "crop 1", "crop 2"]
    assert len({box["tokens"][1] for box in boxes}) == 2  # with heatmaps: at most two panels a row
    for panel, box in zip(panels, boxes, strict=True):
        untouched = (cell_centers(picture, box["tokens"], (24, 24)) == np.asarray(panel.image)[7::14, 7::14]).all(-1)
        assert untouched.sum() == 19  # exactly the kept patches show the crop's own pixels


def test_processor_view_without_a_processor_spans_the_range():
    (view,) = processor_view(torch.linspace(-1, 1, 3 * 4 * 4).view(1, 3, 4, 4))
    pixels = np.asarray(view)
    assert pixels.min() == 0 and pixels.max() == 255
    with pytest.raises(ValueError, match="pixel_values"):
        processor_view(torch.zeros(3, 4, 4))


# --- `vlmzip show` ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tiny):
    directory = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "scene.png"
    random_images(1)[0].save(path)
    return path


def assert_one_line_error(err: str, message: str) -> None:
    # Model loading may draw a progress bar first; the error itself is the last line, alone.
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vlmzip show: error:") and message in last, err


def test_show_writes_the_picture(tiny_dir, image_file, tmp_path, capsys):
    out = tmp_path / "show.png"
    argv = ["show", "--image", str(image_file), "--model", str(tiny_dir), "--tokens", "32", "--heatmap", "-o", str(out)]
    assert main(argv) == 0
    assert "32 of 577 tokens: 27 dominant + 5 contextual" in capsys.readouterr().out
    picture = Image.open(out)
    assert picture.width > 2 * 336  # tokens and heatmap side by side
    split = ["show", "--image", str(image_file), "--model", str(tiny_dir), "--dominant", "8", "--contextual", "0"]
    assert main([*split, "-o", str(out)]) == 0
    assert "8 of 577 tokens: 8 dominant + 0 contextual" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tokens", "0"], "tokens must be an integer >= 1"),
        (["--tokens", "9999"], "must be <= 576"),
        (["--dominant", "8"], "must be given together"),
        (["--tokens", "8", "--contextual", "2"], "not both"),
        (["--method", "magic"], "method must be one of"),
    ],
)
def test_show_budget_errors(tiny_dir, image_file, tmp_path, capsys, extra, message):
    argv = ["show", "--image", str(image_file), "--model", str(tiny_dir), "-o", str(tmp_path / "x.png"), *extra]
    assert main(argv) == 2
    assert_one_line_error(capsys.readouterr().err, message)


def test_show_file_errors(tiny_dir, image_file, tmp_path, capsys):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    cases = [
        (["--image", str(tmp_path / "missing.png")], "image not found"),
        (["--image", str(text)], "not a readable image"),
        (["--image", str(image_file), "-o", str(tmp_path / "out.txt")], "unknown image format"),
        (["--image", str(image_file), "--model", str(tmp_path / "nope")], "model directory not found"),
    ]
    for extra, message in cases:
        argv = ["show", "-o", str(tmp_path / "o.png"), "--model", str(tiny_dir), *extra]
        assert main(argv) == 2, extra
        assert_one_line_error(capsys.readouterr().err, message)
