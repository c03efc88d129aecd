"""The frozen DINOv2 tower's features of the generated scenes, cached on disk for the training recipe."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from vlmzip.default_model import build, data

FEATURE_DIM = 384  # DINOv2-S/14 hidden size
TOWER_LAYERS = 12  # DINOv2-S/14 transformer layers


class Progress:
    """Minimal progress line (rich when available, plain prints otherwise)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.start, self.last = total, label, time.time(), 0.0

    def update(self, done: int, extra: str = "") -> None:
        now = time.time()
        if now - self.last < 10 and done < self.total:
            return
        self.last = now
        elapsed = now - self.start
        eta = elapsed / max(done, 1) * (self.total - done)
        print(f"[{self.label}] {done}/{self.total} {elapsed:6.0f}s elapsed, eta {eta:5.0f}s {extra}", flush=True)


def feature_tower(layer: int = build.VISION_FEATURE_LAYER):
    """The frozen tower truncated after the feature layer (``hidden_states[layer]``, -2 by default): the
    layers after it are never needed."""
    from vlmzip.default_model.convert import load_dinov2_from_onnx

    tower = load_dinov2_from_onnx()
    tower.encoder.layer = tower.encoder.layer[: len(tower.encoder.layer) + layer + 1]
    return tower.eval()


@torch.inference_mode()
def extract_features(
    split: str, num_images: int, seed: int, path: Path, batch_size: int = 8, layer: int = build.VISION_FEATURE_LAYER
) -> np.ndarray:
    """Cache ``hidden_states[layer]`` (float16, (N, 577, 384)) of ``num_images`` scenes; reuse if present."""
    path = Path(path)
    if path.is_file():
        feats = np.load(path, mmap_mode="r")
        if feats.shape == (num_images, build.NUM_IMAGE_TOKENS, FEATURE_DIM):
            return feats
    tower = feature_tower(layer)
    processor = build.build_image_processor()
    out = np.lib.format.open_memmap(
        path.with_suffix(".tmp.npy"),
        mode="w+",
        dtype=np.float16,
        shape=(num_images, build.NUM_IMAGE_TOKENS, FEATURE_DIM),
    )
    progress = Progress(num_images, f"features:{split}")
    for start in range(0, num_images, batch_size):
        stop = min(start + batch_size, num_images)
        images = [data.generate_scene(seed, split, i).image for i in range(start, stop)]
        pixels = processor(images=images, return_tensors="pt")["pixel_values"]
        hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[-1]
        out[start:stop] = hidden.to(torch.float16).numpy()
        progress.update(stop)
    out.flush()
    del out
    path.with_suffix(".tmp.npy").rename(path)
    return np.load(path, mmap_mode="r")


def feature_stats(features: np.ndarray, num_images: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean/std of the tower features (DINOv2 layer outputs are not normalised)."""
    sample = torch.from_numpy(np.asarray(features[:num_images], dtype=np.float32)).reshape(-1, FEATURE_DIM)
    return sample.mean(0), sample.std(0).clamp_min(1e-3)
