"""ImageCache: reduced, projected visual tokens kept per image, so a repeated image skips the tower.

VisionZip's reduction does not depend on the text: once an image is reduced, its tokens are final.
`vlmzip.apply(model, ..., cache=ImageCache(max_bytes=...))` makes `prepare()` (and `generate` /
`forward` preparing themselves) look every image (or video) up before encoding it. The key is a
content hash of the image's pixel values together with everything that changes its tokens: the
model (class, configuration and the weights outside the language model), the VisionZip config,
the feature layer, the dtype, and the image's layout (crop count and image size, Qwen's grid, the
modality). A hit skips the vision tower and the selection and reuses the stored features; a miss
encodes the missing images only (in one tower call) and stores them.

Memory is bounded by `max_bytes` (least recently used entries are dropped first). With a
`directory`, every entry is also written there as a safetensors file (atomically: a temporary
file, then a rename), and entries missing from memory are read back from it, e.g. by an
evaluation that restarts. A file is used only when its metadata names the same key and format,
its checksum matches and its tensors have the expected shapes; anything else is ignored (and
overwritten on the next store).

Features from the cache carry no gradient: attach a cache for inference, not for training.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlmzip._validation import check_int

FORMAT = "vlmzip-image-cache"
FORMAT_VERSION = "1"
SUFFIX = ".safetensors"
_KEY_LENGTH = 40  # hex digits of a key (blake2b, 20 bytes)


@dataclass
class VisualUnit:
    """One image (or video) of a batch as the cache keys it: its own pixels and its layout.

    tensors: this item's pixel values alone (batch padding dropped).
    layout: everything else about the item that changes its tokens (image size, crops, grid, ...),
        as plain numbers and strings.
    full_count: placeholders the processor emitted for it; token_id: the placeholder's token id.
    """

    modality: str
    tensors: tuple[torch.Tensor, ...]
    layout: tuple[Any, ...]
    full_count: int
    token_id: int


@dataclass
class CachedVisual:
    """What the cache holds per item: the reduced, projected tokens as the language model receives them.

    slots: positions (within the item's placeholder run, ascending) its tokens take, or None for
    the first `features.shape[0]` positions.
    positions: under `positions="original"`, the placeholder (within the item's run) whose position
    id each token takes (see `EncodedImages.positions`); None otherwise.
    """

    features: torch.Tensor
    full_count: int
    slots: torch.Tensor | None = None
    modality: str = "image"
    positions: torch.Tensor | None = None

    def _indices(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.slots, self.positions) if t is not None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.features, *self._indices()))

    def _with(self, convert: Any) -> CachedVisual:
        optional = [convert(t) if t is not None else None for t in (self.slots, self.positions)]
        return CachedVisual(convert(self.features), self.full_count, optional[0], self.modality, optional[1])

    def detached(self) -> CachedVisual:
        """A copy that owns its memory (not a view into a batch) and carries no autograd history."""
        return self._with(lambda t: t.detach().clone())

    def to(self, device: torch.device) -> CachedVisual:
        return self._with(lambda t: t.to(device))

    def is_consistent(self) -> bool:
        """Shapes and values a valid entry has (used before trusting anything read from disk)."""
        features, slots = self.features, self.slots
        if features.ndim != 2 or not features.is_floating_point() or not 0 < features.shape[0] <= self.full_count:
            return False
        for indices in self._indices():
            if indices.ndim != 1 or indices.dtype != torch.int64 or indices.numel() != features.shape[0]:
                return False
            if not (0 <= int(indices.min()) and int(indices.max()) < self.full_count):
                return False
        if slots is not None and slots.numel() > 1 and not bool((slots[1:] > slots[:-1]).all()):
            return False
        return True


def hash_tensors(digest: Any, tensors: Iterable[torch.Tensor]) -> None:
    """Feed dtype, shape and raw bytes of every tensor into a hashlib object."""
    for tensor in tensors:
        data = tensor.detach()
        digest.update(f"{data.dtype}|{tuple(data.shape)}|".encode())
        if data.numel():
            digest.update(data.reshape(-1).contiguous().cpu().view(torch.uint8).numpy())


def _language_parameters(model: nn.Module) -> set[int]:
    """ids of the language model's parameters (and the output head): they do not change visual tokens."""
    ids: set[int] = set()
    language_model = getattr(getattr(model, "model", None), "language_model", None)
    for part in (language_model, getattr(model, "lm_head", None)):
        if isinstance(part, nn.Module):
            ids.update(id(parameter) for parameter in part.parameters())
    return ids


def visual_parameters(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Named parameters and buffers outside the language model: the ones visual tokens depend on."""
    skip = _language_parameters(model)
    named = [*model.named_parameters(), *model.named_buffers()]
    return [(name, tensor) for name, tensor in named if id(tensor) not in skip]


def model_identity(model: nn.Module) -> str:
    """A digest of the model's class, configuration and weights outside the language model."""
    digest = hashlib.blake2b(digest_size=20)
    digest.update(type(model).__qualname__.encode())
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        settings = config.to_dict()
        settings.pop("_name_or_path", None)
        settings["_attn_implementation"] = getattr(config, "_attn_implementation", None)
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in visual_parameters(model):
        digest.update(name.encode())
        hash_tensors(digest, [tensor])
    return digest.hexdigest()


def _versions(model: nn.Module) -> tuple[int, ...]:
    """Tensor version counters of the visual weights: they change on any in-place update."""
    return tuple(tensor._version for _, tensor in visual_parameters(model))


@dataclass
class _Identity:
    versions: tuple[int, ...]
    digest: str


@dataclass(eq=False)
class ImageCache:
    """Reduced visual tokens per image, in memory (LRU, at most `max_bytes`) and optionally on disk.

    `cache = vlmzip.ImageCache(max_bytes=512 * 2**20)`, then `vlmzip.apply(model, dominant=54,
    contextual=10, cache=cache)`. `hits` and `misses` count item lookups (an image or a video each),
    `nbytes` the memory the entries hold, `clear()` empties it. `directory` (optional): a folder
    where every entry is also stored as a safetensors file and read back on a memory miss.
    One cache may serve several models and budgets: they never share keys.
    """

    max_bytes: int
    directory: str | os.PathLike[str] | None = None
    hits: int = field(default=0, init=False)
    misses: int = field(default=0, init=False)
    nbytes: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.max_bytes = check_int("max_bytes", self.max_bytes, 0)
        if self.directory is not None:
            if not isinstance(self.directory, (str, os.PathLike)) or not str(self.directory):
                raise TypeError(f"directory must be a folder path or None, got {self.directory!r}")
            path = Path(self.directory)
            if path.exists() and not path.is_dir():
                raise ValueError(f"directory must be a folder, got the file {path}")
            path.mkdir(parents=True, exist_ok=True)
            self.directory = path
        self._entries: OrderedDict[str, CachedVisual] = OrderedDict()
        self._lock = threading.RLock()
        self._identities: weakref.WeakKeyDictionary[nn.Module, _Identity] = weakref.WeakKeyDictionary()

    def __repr__(self) -> str:
        return (
            f"ImageCache(max_bytes={self.max_bytes}, directory={self.directory!r}, entries={len(self)}, "
            f"nbytes={self.nbytes}, hits={self.hits}, misses={self.misses})"
        )

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    # --- keys -----------------------------------------------------------------------------------
    def model_key(self, model: nn.Module) -> str:
        """`model_identity(model)`, recomputed only when the visual weights changed in place."""
        versions = _versions(model)
        with self._lock:
            known = self._identities.get(model)
            if known is None or known.versions != versions:
                known = _Identity(versions, model_identity(model))
                self._identities[model] = known
            return known.digest

    def key(self, context: Mapping[str, Any], unit: VisualUnit) -> str:
        """The key of one item: its pixels and layout under `context` (model, config, dtype, layer)."""
        digest = hashlib.blake2b(digest_size=_KEY_LENGTH // 2)
        header = {"format": FORMAT, "version": FORMAT_VERSION, "context": context}
        header.update(modality=unit.modality, layout=unit.layout, full_count=unit.full_count)
        digest.update(json.dumps(header, sort_keys=True, default=str).encode())
        hash_tensors(digest, unit.tensors)
        return digest.hexdigest()

    # --- lookups --------------------------------------------------------------------------------
    def get(self, key: str) -> CachedVisual | None:
        """The entry stored under `key` (from memory, else from the directory), counting a hit or a miss."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            else:
                entry = self._read(key)
                if entry is not None:
                    self._remember(key, entry)
            if entry is None:
                self.misses += 1
            else:
                self.hits += 1
            return entry

    def put(self, key: str, entry: CachedVisual) -> None:
        """Store `entry` under `key` (a detached copy), evicting the least recently used entries to fit."""
        if not isinstance(entry, CachedVisual):
            raise TypeError(f"entry must be a CachedVisual, got {type(entry).__name__}")
        entry = entry.detached()
        with self._lock:
            self._remember(key, entry)
            if self.directory is not None:
                self._write(key, entry)

    def clear(self) -> None:
        """Drop every entry (and this cache's files in `directory`) and reset the counters."""
        with self._lock:
            self._entries.clear()
            self.nbytes = 0
            self.hits = 0
            self.misses = 0
            if self.directory is not None:
                for path in Path(self.directory).glob(f"*{SUFFIX}"):
                    if _is_key(path.name[: -len(SUFFIX)]):
                        path.unlink(missing_ok=True)

    def _remember(self, key: str, entry: CachedVisual) -> None:
        previous = self._entries.pop(key, None)
        if previous is not None:
            self.nbytes -= previous.nbytes
        if entry.nbytes > self.max_bytes:
            return  # too large to keep in memory at all
        while self._entries and self.nbytes + entry.nbytes > self.max_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.nbytes -= dropped.nbytes
        self._entries[key] = entry
        self.nbytes += entry.nbytes

    # --- disk -----------------------------------------------------------------------------------
    def _path(self, key: str) -> Path:
        return Path(self.directory) / f"{key}{SUFFIX}"  # type: ignore[arg-type]

    def _write(self, key: str, entry: CachedVisual) -> None:
        from safetensors.torch import save_file

        tensors = {"features": entry.features.detach().cpu().contiguous()}
        for name, value in (("slots", entry.slots), ("positions", entry.positions)):
            if value is not None:
                tensors[name] = value.detach().cpu().contiguous()
        metadata = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "key": key,
            "full_count": str(entry.full_count),
            "modality": entry.modality,
            "checksum": _checksum(tensors),
        }
        directory = Path(self.directory)  # type: ignore[arg-type]
        handle, temporary = tempfile.mkstemp(prefix=".tmp-", suffix=SUFFIX, dir=directory)
        os.close(handle)
        try:
            save_file(tensors, temporary, metadata=metadata)
            os.replace(temporary, self._path(key))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def _read(self, key: str) -> CachedVisual | None:
        if self.directory is None or not _is_key(key):
            return None
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                names = set(handle.keys())
                if not names <= {"features", "slots", "positions"} or "features" not in names:
                    return None
                tensors = {name: handle.get_tensor(name) for name in names}
            if (metadata.get("format"), metadata.get("version"), metadata.get("key")) != (FORMAT, FORMAT_VERSION, key):
                return None
            if metadata.get("checksum") != _checksum(tensors):
                return None
            entry = CachedVisual(
                features=tensors["features"],
                full_count=int(metadata["full_count"]),
                slots=tensors.get("slots"),
                modality=str(metadata["modality"]),
                positions=tensors.get("positions"),
            )
        except Exception:  # a truncated, corrupt or foreign file is a miss, never an error
            return None
        return entry if entry.is_consistent() else None


def _is_key(text: str) -> bool:
    return len(text) == _KEY_LENGTH and all(c in "0123456789abcdef" for c in text)


def _checksum(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        digest.update(name.encode())
        hash_tensors(digest, [tensors[name]])
    return digest.hexdigest()


def check_cache(cache: object) -> ImageCache | None:
    """`cache` if it is an ImageCache or None, else a TypeError naming the parameter."""
    if cache is not None and not isinstance(cache, ImageCache):
        raise TypeError(f"cache must be a vlmzip.ImageCache or None, got {type(cache).__name__}")
    return cache


__all__ = ["CachedVisual", "ImageCache", "VisualUnit", "check_cache", "model_identity"]
