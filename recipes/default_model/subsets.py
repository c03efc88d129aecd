"""Which tokens a training scene is seen with: all of them, an object-keeping subset or a random one, the
contextual tokens that merge what a subset drops, and the targets of the image-token head on the tokens kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from vlmzip.core import contextual_targets, merge_contextual
from vlmzip.default_model import data


@dataclass(frozen=True)
class SubsetMode:
    """How the scenes of one training step are reduced (one mode a step keeps the padded length short)."""

    kind: str  # "all", "objects" or "random"
    object_share: float = 1.0  # objects: share of an object's other patches kept
    background_share: float = 1.0  # objects: share of background patches kept
    size: int = 0  # random: tokens kept besides [CLS]


# A sparse object-keeping subset keeps less than this share of the background (~26 of ~525 patches).
SPARSE_BACKGROUND_MAX = 0.05


def subset_mode(rng: np.random.Generator, settings: Any) -> SubsetMode:
    """A step's mode: all tokens, an object-keeping subset or a random one, by the settings' shares."""
    u = rng.uniform()
    if u < settings.full_share:
        return SubsetMode("all")
    if u < settings.full_share + settings.object_subset_share:
        object_share = float(rng.uniform(settings.object_share_min, 1.0))
        # The extra draw only when the share is set, so that earlier settings keep their random stream.
        sparse = settings.sparse_share > 0 and rng.uniform() < settings.sparse_share
        background_max = SPARSE_BACKGROUND_MAX if sparse else 1.0
        return SubsetMode("objects", object_share, float(rng.uniform(0.0, background_max)))
    return SubsetMode("random", size=int(rng.integers(32, data.GRID * data.GRID)))


def token_subset(objects, rng: np.random.Generator, mode: SubsetMode) -> np.ndarray | None:
    """Indices (into the 577 tokens, [CLS] = 0, raster order) of the tokens a scene is seen with; None = all.

    Token reduction hands the language model fewer, renumbered tokens. Training on object-keeping subsets
    (every object's centre patch, a share of its other patches and of the background) teaches it to read
    objects whatever surrounds them; random subsets teach it to degrade gracefully.
    """
    if mode.kind == "all":
        return None
    n_patch = data.GRID * data.GRID
    if mode.kind == "objects":
        labels = data.patch_labels(objects)
        on_object = labels > 0
        keep = np.where(on_object, rng.uniform(size=n_patch) < mode.object_share, False)
        keep |= ~on_object & (rng.uniform(size=n_patch) < mode.background_share)
        keep[data.centre_patches(objects)] = True
        patches = np.flatnonzero(keep)
    else:
        patches = np.sort(rng.choice(n_patch, size=mode.size, replace=False))
    return np.concatenate([[0], patches + 1])


def contextual_tokens(features: torch.Tensor, subset: np.ndarray, count: int) -> tuple[torch.Tensor, np.ndarray]:
    """The tokens a subset drops, merged into ``count`` contextual tokens as VisionZip merges them.

    ``features``: (577, hidden) tower features of one scene ([CLS] first); ``subset``: the kept indices.
    The dropped tokens join evenly spaced targets by cosine similarity of their features (VisionZip compares
    attention keys, which the feature cache does not hold) and each group becomes target + mean. Returns the
    contextual features (count, hidden) and each one's anchor, the index of its target, where
    ``positions="original"`` places it; ``count`` is capped at the number of dropped tokens.
    """
    dropped = np.setdiff1d(np.arange(features.shape[0]), subset)
    count = min(count, dropped.size)
    if count == 0:
        return features.new_zeros(0, features.shape[1]), np.zeros(0, dtype=np.int64)
    kept = torch.from_numpy(np.asarray(subset, dtype=np.int64))[None]
    merged, _ = merge_contextual(features[None], features[None], kept, count)
    return merged[0], dropped[contextual_targets(dropped.size, count).numpy()]


def image_token_targets(objects_list, subsets, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets of the image-token head, (B, length) each, -100 at [CLS] and padding: whether a token is the
    first kept token of its object in raster order (the token order), and its patch class."""
    first = torch.full((len(objects_list), length), -100, dtype=torch.long)
    classes = torch.full((len(objects_list), length), -100, dtype=torch.long)
    for b, (objects, subset) in enumerate(zip(objects_list, subsets, strict=True)):
        owner = data.patch_objects(objects)
        labels = data.object_classes(objects)[owner + 1]
        patches = np.arange(owner.size) if subset is None else subset[1:] - 1
        kept_owner = owner[patches]
        is_first = np.zeros(patches.size, dtype=np.int64)
        on_object = np.flatnonzero(kept_owner >= 0)
        _, first_of_object = np.unique(kept_owner[on_object], return_index=True)
        is_first[on_object[first_of_object]] = 1
        first[b, 1 : 1 + patches.size] = torch.from_numpy(is_first)
        classes[b, 1 : 1 + patches.size] = torch.from_numpy(labels[patches])
    return first, classes
