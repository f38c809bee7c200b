"""Crash-safe checkpoint files, and telling a complete checkpoint from a half-written one.

Lightning 2.6's `TorchCheckpointIO` serialises the whole checkpoint into memory, writes it to a
`tempfile.mkstemp()` file in the system temp folder and `shutil.move`s it into place (fsspec's
transaction). When /tmp is another filesystem the move is a copy, in place, so a kill during it
leaves a truncated file under the final name; nothing is fsynced, and a killed run leaves a
checkpoint-sized orphan in /tmp. `AtomicCheckpointIO` writes next to the target instead:

    <dir>/.<name>.partial-<pid>   torch.save, flush, fsync
    os.replace -> <dir>/<name>    atomic on POSIX: readers see the old file or the new one
    fsync(<dir>)                  the rename itself survives a power loss

The temporary name starts with a dot and does not end in `.ckpt`, so no `*.ckpt` search (Lightning's
or `find_last_checkpoint`'s) ever matches it. Loads read data only (`safe_load.load_file`:
weights_only=True and the project's allow-list, whatever `weights_only` Lightning passes). Sharded
(FSDP2) checkpoints are folders written by torch.distributed.checkpoint and never pass through a
CheckpointIO; `checkpoint_problem` recognises an incomplete folder instead (see there).
"""

from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffv2_lit.checkpoint.layout import PARTIAL_MARK
from diffv2_lit.checkpoint.safe_load import load_complete


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose saves are atomic (temp file in the same folder, fsync, rename), whose
    loads never run code from the file (`safe_load`), and whose load errors name the file instead of
    surfacing as a pickle / zip traceback."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_partials(path)
        partial = path.with_name(f".{path.name}{PARTIAL_MARK}{os.getpid()}")
        try:
            self._write(checkpoint, partial)
            os.replace(partial, path)
        finally:
            if partial.exists():  # the write failed (disk full, ...): leave the old checkpoint alone
                partial.unlink()
        _fsync_dir(path.parent)

    def _write(self, checkpoint: dict[str, Any], partial: Path) -> None:
        with open(partial, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())

    def load_checkpoint(self, path, map_location: Any = "cpu", weights_only: bool | None = None) -> dict:
        """`weights_only` is ignored: only data is ever loaded (the opt-in is DIFFV2_LIT_TRUST_CHECKPOINTS)."""
        return load_complete(path, map_location=map_location)


def _remove_stale_partials(path: Path) -> None:
    """Temp files of this checkpoint name left by a killed process."""
    for stale in glob.glob(str(path.with_name(f".{path.name}{PARTIAL_MARK}*"))):
        try:
            os.remove(stale)
        except FileNotFoundError:
            pass


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
