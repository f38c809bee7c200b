"""`RemoveEmptyRunFolder`: a run that fails before it has logged a value or saved a checkpoint leaves no folder.

Every run gets a new `runs/<name>/version_<n>` as soon as its logger starts. When the run fails before it
logged anything (a missing data folder, out of memory at the first step), the folder holds only an empty
event file: it is removed, so that `diffv2-lit compare runs/<name>` and `--ckpt_path last` never see it.
A folder that holds any logged value, any checkpoint or a spike record is kept: a run that diverged or
crashed at step 1000 keeps its curves.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import lightning as L


class RemoveEmptyRunFolder(L.Callback):
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        logger = trainer.logger
        log_dir = getattr(logger, "log_dir", None) if logger is not None else None
        if not trainer.is_global_zero or not log_dir or not os.path.isdir(log_dir):
            return
        if holds_nothing(Path(log_dir)):
            shutil.rmtree(log_dir, ignore_errors=True)
            print(f"removed {log_dir}: the run failed before logging anything", file=sys.stderr)


def holds_nothing(folder: Path) -> bool:
    """No checkpoint, no spike record, no logged value in its TensorBoard event files."""
    for path in folder.rglob("*"):
        if path.suffix == ".ckpt" or path.name == "spikes.jsonl":  # a .ckpt file, or a sharded .ckpt folder
            return False
        if path.name.startswith("events.out.tfevents") and _has_values(path):
            return False
    return True


def _has_values(event_file: Path) -> bool:
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    try:
        return any(event.HasField("summary") and event.summary.value for event in EventFileLoader(str(event_file)).Load())
    except Exception:  # unreadable: keep the folder, it is not ours to judge
        return True
