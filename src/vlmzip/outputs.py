"""Where the commands write: never over their own inputs, and never half a result.

Every command that writes checks its outputs with `refuse_overlap` before any work: an output that
is, lies inside, or contains one of the command's inputs (model directory, image, data file) is
refused, whatever --overwrite/--force say, since replacing it would destroy the input.

Results appear whole or not at all: `replacing_directory` and `replacing_file` write into a
temporary sibling and rename it into place at the end, so an interrupted command leaves the
previous output as it was and no partial one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Inputs = Iterable[tuple[str, "str | Path | None"]]


def _real(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def _relation(output: Path, source: Path) -> str | None:
    real_output, real_source = _real(output), _real(source)
    if real_output == real_source or (
        output.exists() and source.exists() and os.path.samefile(output, source)  # hard links, bind mounts
    ):
        return "is"
    if real_source in real_output.parents:
        return "is inside"
    if real_output in real_source.parents:
        return "contains"
    return None


def refuse_overlap(output: str | Path, inputs: Inputs, option: str = "-o/--output") -> Path:
    """`output` as a Path; raise ValueError if it is, lies inside, or contains one of `inputs`.

    `inputs` are (what, path) pairs such as ("--model", "my-model"); None paths are skipped.
    Symbolic links are followed, so two names of one file or directory count as the same.
    """
    output = Path(output)
    for what, path in inputs:
        if path is None:
            continue
        relation = _relation(output, Path(path))
        if relation is not None:
            raise ValueError(
                f"{option} {output} {relation} the input {what} ({path}); writing there would destroy it. "
                f"Choose an {option} outside every input (this is refused even with --overwrite/--force)"
            )
    return output


def swap_into_place(staged: Path, target: Path) -> None:
    """Rename `staged` to `target`; an existing `target` is moved aside first and deleted last.

    If the final rename fails, the previous `target` is put back.
    """
    backup = None
    if target.exists() or target.is_symlink():
        backup = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(backup)
    try:
        staged.rename(target)
    except BaseException:
        if backup is not None:
            backup.rename(target)
        raise
    if backup is not None:
        if backup.is_dir() and not backup.is_symlink():
            shutil.rmtree(backup)
        else:
            backup.unlink()


@contextmanager
def replacing_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `target`; on success it becomes `target`.

    A previous `target` is replaced only once everything is written (no stale files of it remain);
    on any error, or an interrupt, the temporary directory is removed and `target` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        swap_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def replacing_file(target: str | Path) -> Iterator[Path]:
    """Yield a temporary file path beside `target` (same suffix); on success it replaces `target` at once."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{target.stem}.", suffix=f".partial{target.suffix}", dir=target.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON through `replacing_file`: readers never see half a file."""
    path = Path(path)
    with replacing_file(path) as temporary:
        temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def save_image(picture: Any, path: str | Path) -> Path:
    """Save a PIL image through `replacing_file`, in the format its extension names."""
    from PIL import Image

    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        raise ValueError(
            f"unknown image format {path.suffix or '(no extension)'!r} for {path}; use .png, .jpg or .webp"
        )
    with replacing_file(path) as temporary:
        picture.save(temporary, format=image_format)
    return path


def embedded_model_inputs() -> list[tuple[str, Path]]:
    """The embedded default model's files and its assembled copy: inputs of every command run without --model."""
    from vlmzip.default_model import cache_root, files_dir

    return [("embedded default model", files_dir()), ("embedded default model", cache_root() / "default-model")]


def model_inputs(model: str | Path | None) -> list[tuple[str, str | Path]]:
    """The inputs a --model option stands for: the directory given, else the embedded default model."""
    return [("--model", model)] if model is not None else embedded_model_inputs()
