"""A run's directories: the output and the working directory beside it, with resume and the final swap."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vlmzip.finetune.options import PARTIAL_SUFFIX, RUN_FILE
from vlmzip.outputs import refuse_overlap, swap_into_place


class RunDirectory:
    """The output directory and the working directory beside it (`OUT.partial`).

    Checkpoints and the finished model are written under the working directory; only a complete
    result is moved into place, so an interrupted run never touches an existing output directory.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output = output_dir
        self.work = output_dir.with_name(output_dir.name + PARTIAL_SUFFIX)
        self.checkpoints = self.work / "checkpoints"
        self.staged = self.work / "result"

    def check(self, resume: bool, overwrite: bool, inputs: Sequence[tuple[str, Any]] = ()) -> None:
        """Refuse an output over an input (always) or over an existing result or interrupted run (unless asked)."""
        refuse_overlap(self.output, inputs)
        refuse_overlap(self.work, inputs, f"the working directory of -o/--output ({PARTIAL_SUFFIX})")
        if self.output.exists() and not overwrite:
            raise FileExistsError(f"output directory exists: {self.output}; pass --overwrite to replace it")
        if self.work.exists() and not resume and not overwrite:
            raise FileExistsError(
                f"an interrupted run is in {self.work}: pass --resume to continue it or --overwrite to start over"
            )

    def check_resumable(self, run: dict[str, Any]) -> None:
        """Resuming needs the interrupted run's settings: refuse early when they differ."""
        run_file = self.work / RUN_FILE
        if not run_file.is_file():
            return
        try:
            previous = json.loads(run_file.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
        changed = sorted(key for key in set(run) | set(previous) if run.get(key) != previous.get(key))
        if changed:
            raise ValueError(
                f"--resume: the interrupted run in {self.work} used different settings ({', '.join(changed)}); "
                "rerun with the same settings, or pass --overwrite to start over"
            )

    def start(self, run: dict[str, Any], resume: bool) -> str | None:
        """Create the working directory; returns the checkpoint to resume from (or None)."""
        from transformers.trainer_utils import get_last_checkpoint

        if resume and (self.work / RUN_FILE).is_file():
            self.check_resumable(run)
            checkpoint = get_last_checkpoint(str(self.checkpoints)) if self.checkpoints.is_dir() else None
            shutil.rmtree(self.staged, ignore_errors=True)
            return checkpoint
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        (self.work / RUN_FILE).write_text(json.dumps(run, indent=2) + "\n", encoding="utf-8")
        return None

    def finish(self) -> None:
        """Move the staged result into place (replacing the old output last) and drop the working directory."""
        swap_into_place(self.staged, self.output)
        shutil.rmtree(self.work, ignore_errors=True)
