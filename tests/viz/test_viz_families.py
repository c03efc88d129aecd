"""`vlmzip show` panels for families whose tokens are merged patches (SmolVLM's tiles, Mistral 3's images)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import vlmzip
from bench.tiny_model import save_family
from conftest import random_images
from families import make_mistral3, make_mistral3_processor, make_smolvlm, make_smolvlm_processor
from vlmzip.cli import main
from vlmzip.viz import reduce_image, visualize


def test_smolvlm_one_panel_per_tile_on_the_shuffled_grid():
    model, processor = make_smolvlm(), make_smolvlm_processor()
    image = random_images(1, size=(300, 400))[0]
    config = vlmzip.VisionZipConfig(dominant=5, contextual=2)
    panels = reduce_image(model, processor, image, config)
    assert [panel.label for panel in panels] == ["tile 1", "tile 2", "tile 3", "tile 4", "global image"]
    assert all(panel.grid == (4, 4) and (panel.dominant, panel.contextual) == (5, 2) for panel in panels)
    # The panels show what prepare() sends: the same kept units, tile by tile.
    vlmzip.apply(model, config)
    inputs = processor(text=["USER: <image> a ASSISTANT:"], images=[[image]], return_tensors="pt")
    with torch.no_grad():
        vlmzip.prepare(model, inputs)
    (reduction,) = vlmzip.api.get_state(model).adapter.last_encoded.reductions
    assert torch.equal(torch.cat([panel.reduction.kept_indices for panel in panels]), reduction.kept_indices)
    picture = visualize(panels, heatmap=True)
    assert [box["label"] for box in picture.info["visionzip_panels"]] == [panel.label for panel in panels]


def test_mistral3_one_panel_on_the_merged_grid():
    model, processor = make_mistral3(), make_mistral3_processor()
    image = random_images(1, size=(300, 400))[0]
    config = vlmzip.VisionZipConfig(dominant=6, contextual=3)
    (panel,) = reduce_image(model, processor, image, config)
    assert panel.grid == (6, 8) and (panel.dominant, panel.contextual) == (6, 3) and panel.total_tokens == 48
    vlmzip.apply(model, config)
    inputs = processor(text=["USER: [IMG] a ASSISTANT:"], images=[image], return_tensors="pt")
    with torch.no_grad():
        vlmzip.prepare(model, inputs)
    (reduction,) = vlmzip.api.get_state(model).adapter.last_encoded.reductions
    assert torch.equal(panel.reduction.kept_indices, reduction.kept_indices)


@pytest.mark.parametrize(
    ("family", "summary"), [("smolvlm", "35 of 80 tokens over 5 panels"), ("mistral3", "7 of 48 tokens")]
)
def test_show_command(family, summary, tmp_path, capsys):
    directory = save_family(family, tmp_path / family)
    image = tmp_path / "scene.png"
    random_images(1, size=(300, 400))[0].save(image)
    out = tmp_path / "show.png"
    argv = ["show", "--image", str(image), "--model", str(directory), "--dominant", "5", "--contextual", "2"]
    assert main([*argv, "--heatmap", "-o", str(out)]) == 0
    assert summary in capsys.readouterr().out
    assert Image.open(out).width > 0
    too_many = ["show", "--image", str(image), "--model", str(directory), "--tokens", "99", "-o", str(out)]
    assert main(too_many) == 2
    assert "must be <=" in capsys.readouterr().err.strip().splitlines()[-1]
