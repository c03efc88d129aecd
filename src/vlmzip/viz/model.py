"""From a model to what `visualize` draws: the processor's view of an image, and the reduction the model makes of it.

These run the model's vision tower through its family adapter (never patching the model); the
drawing itself is in `vlmzip.viz.draw`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from vlmzip.config import VisionZipConfig, check_int
from vlmzip.core import Reduction
from vlmzip.images import load_image
from vlmzip.viz.panels import ReducedImage, split_reduction


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
    rows = split_reduction(reduction)
    if len(rows) != len(views):
        raise ValueError(f"reduction holds {len(rows)} images but pixel_values holds {len(views)}")
    patch_size = check_int("patch_size", patch_size, 1)
    grid = (pixel_values.shape[-2] // patch_size, pixel_values.shape[-1] // patch_size)
    if labels is None:
        labels = default_labels(len(views))
    if len(labels) != len(views):
        raise ValueError(f"labels must have one entry per image ({len(views)}), got {len(labels)}")
    return [
        ReducedImage(view, row, grid, num_prefix_tokens, str(label))
        for view, row, label in zip(views, rows, labels, strict=True)
    ]


def default_labels(count: int) -> list[str]:
    """Captions of `count` images without labels of their own: none for one, "image 1", "image 2", ... for several."""
    return [f"image {index + 1}" for index in range(count)] if count > 1 else [""]


def _crop_labels(count: int) -> list[str]:
    # AnyRes processors (LLaVA-NeXT, OneVision) put the whole image, resized, before the grid crops.
    return ["base image"] + [f"crop {index}" for index in range(1, count)]


def model_adapter(model: nn.Module, config: VisionZipConfig | None = None, processor: Any = None) -> Any:
    """The family adapter for `model`, without patching it.

    With `config` None: the applied VisionZip's adapter when there is one, else the family's geometry
    (`vlmzip.adapters.geometry_of`: tower, projector and token counts, no budget).
    """
    from vlmzip.adapters import adapter_class_for, geometry_of
    from vlmzip.api import get_state

    adapter_class = adapter_class_for(model)
    if config is None:
        state = get_state(model)
        return state.adapter if state is not None else geometry_of(model, processor)
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
    labels = adapter.unit_labels(pixel_values.shape[0]) or labels
    if not isinstance(reduction, list):
        return reduced_images(
            pixel_values, reduction, adapter.token_pixels, probe.num_prefix_tokens, image_processor, labels
        )
    # An adaptive budget: one reduction per image or crop, each of its own length, so each crop is paired alone.
    if len(reduction) != pixel_values.shape[0]:
        raise RuntimeError(f"the adapter gave {len(reduction)} reductions for {pixel_values.shape[0]} crops")
    labels = list(labels) if labels is not None else default_labels(len(reduction))
    return [
        panel
        for index, unit in enumerate(reduction)
        for panel in reduced_images(
            pixel_values[index : index + 1],
            unit,
            adapter.token_pixels,
            probe.num_prefix_tokens,
            image_processor,
            labels[index : index + 1],
        )
    ]
