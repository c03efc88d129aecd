"""`vlmzip show`, the demo and its panels on Gemma 3 (pooled soft tokens) and InternVL (pixel-shuffled tiles)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlmzip
from bench.tiny_model import save_family
from conftest import random_images
from families import make_gemma3, make_gemma3_processor, make_internvl, make_internvl_processor
from vlmzip.cli import main
from vlmzip.viz import reduce_image, visualize


@pytest.mark.parametrize(
    ("build", "prompt", "labels"),
    [
        ((make_gemma3, make_gemma3_processor), "USER: <start_of_image> what ? ASSISTANT:", [""]),
        (
            (make_internvl, make_internvl_processor),
            "USER: <IMG_CONTEXT> what ? ASSISTANT:",
            ["tile 1", "tile 2", "tile 3", "tile 4", "thumbnail"],
        ),
    ],
    ids=["gemma3", "internvl"],
)
def test_panels_show_the_tokens_the_language_model_gets(build, prompt, labels):
    model, processor = build[0](), build[1]()
    image = random_images(1, size=(300, 400))[0]
    config = vlmzip.VisionZipConfig(dominant=12, contextual=4)
    panels = reduce_image(model, processor, image, config)
    assert [panel.label for panel in panels] == labels
    # One cell per soft token / shuffled unit (8 x 8), each covering 56 / 28 pixels of the tower's input.
    assert all(panel.grid == (8, 8) and panel.num_prefix_tokens == 0 for panel in panels)
    assert all((panel.dominant, panel.contextual, panel.total_tokens) == (12, 4, 64) for panel in panels)
    vlmzip.apply(model, config)
    vlmzip.prepare(model, processor(images=[image], text=[prompt], return_tensors="pt"))
    reduction = vlmzip.api.get_state(model).adapter.last_encoded.reductions[0]
    shown = torch.cat([panel.reduction.kept_indices for panel in panels])
    assert torch.equal(shown, reduction.kept_indices)  # the panels show what prepare() sends
    picture = visualize(panels, heatmap=True)
    assert [box["grid"] for box in picture.info["visionzip_panels"]] == [(8, 8)] * len(labels)


@pytest.mark.parametrize(
    ("family", "summary"),
    [
        ("gemma3", "16 of 64 tokens: 14 dominant + 2 contextual"),
        ("internvl", "80 of 320 tokens over 5 panels: 70 dominant + 10 contextual"),  # 4 tiles + thumbnail
    ],
)
def test_show_command(family, summary, tmp_path, capsys):
    directory = save_family(family, tmp_path / family)
    image = tmp_path / "scene.png"
    random_images(1, size=(300, 400))[0].save(image)
    out = tmp_path / "show.png"
    assert main(["show", "--image", str(image), "--model", str(directory), "--tokens", "16", "-o", str(out)]) == 0
    assert summary in capsys.readouterr().out
    assert Image.open(out).width > 100
    argv = ["show", "--image", str(image), "--model", str(directory), "--tokens", "65", "-o", str(out)]
    assert main(argv) == 2
    assert "must be <= 64" in capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "build",
    [(make_gemma3, make_gemma3_processor), (make_internvl, make_internvl_processor)],
    ids=["gemma3", "internvl"],
)
def test_demo_run_and_its_panels(build):
    from vlmzip.demo import run_demo
    from vlmzip.viz import reduced_images_for

    model, processor = build[0](), build[1]()
    image = random_images(1, size=(300, 400))[0]
    config = vlmzip.VisionZipConfig(dominant=12, contextual=4)
    result = run_demo(model, processor, image, "what is in the image ?", config, repeats=1, max_new_tokens=2)
    panels = reduced_images_for(model, processor, image, result.reduction)
    tiles = len(panels)
    assert (result.full.visual_tokens, result.reduced.visual_tokens) == (tiles * 64, tiles * 16)
    assert all(panel.grid == (8, 8) and panel.kept_tokens == 16 for panel in panels)
    assert not vlmzip.is_applied(model)
