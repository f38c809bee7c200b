"""Where checkpoints live and how to tell a complete one from a half-written one. The one place that
knows the on-disk layout:

    <name>.ckpt                  a Lightning checkpoint file (torch.save, a zip archive)
    <name>.ckpt/                 a sharded checkpoint folder (FSDP2 under ModelParallelStrategy):
        __<rank>_0.distcp          torch.distributed.checkpoint shards, one per rank
        .metadata                  their index, written after every shard
        meta.pt                    Lightning's non-tensor part (hyper-parameters, loops, callbacks), rank 0
        complete.json              {"global_step", "files": {name: bytes}}: written by rank 0 once the save
                                   finished on every rank (atomic_io.MarkShardedSaves), removed before a
                                   save rewrites the folder
    .<name>.partial-<host>-<pid> a file AtomicCheckpointIO is still writing (never matches `*.ckpt`)
    <export>/config.json         a `diffv2-lit export` folder, with `*.safetensors` beside it
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

PARTIAL_MARK = ".partial-"
DCP_METADATA = ".metadata"   # torch.distributed.checkpoint writes it after every shard
LIGHTNING_META = "meta.pt"   # ModelParallelStrategy writes it (rank 0) after the shards
EXPORT_CONFIG = "config.json"
COMPLETE_MARKER = "complete.json"  # diffv2-lit writes it (rank 0) after every rank finished a sharded save


def is_sharded(path) -> bool:
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


def is_export(path) -> bool:
    return Path(path).is_dir() and (Path(path) / EXPORT_CONFIG).is_file()


def checkpoint_problem(path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it looks complete. Cheap: reads no tensors.

    - a file: torch.save's zip format ends with a central directory, which a truncated file lacks;
    - a sharded folder: its `complete.json` must exist and every file it lists must be there with the
      size it lists. No file times: shards are written by every node, whose clocks differ.
    """
    path = Path(path)
    if path.is_symlink() and not path.exists():
        return f"it is a link to {os.readlink(path)}, which does not exist"
    if not path.exists():
        return "it does not exist"
    if path.is_dir():
        return _sharded_problem(path)
    if path.stat().st_size == 0:
        return "the file is empty"
    if not zipfile.is_zipfile(path):
        return "the file is truncated or not a torch.save archive (no zip central directory)"
    return None


def _sharded_problem(folder: Path) -> str | None:
    marker = read_complete_marker(folder)
    if marker is None:
        return (f"the sharded folder has no valid {COMPLETE_MARKER}, which is written once every rank has finished "
                "its save: the save was interrupted")
    for name, size in sorted(marker["files"].items()):
        file = folder / name
        if not file.is_file():
            return f"{name} is missing (listed in {COMPLETE_MARKER}: the folder was changed after its save)"
        if file.stat().st_size != size:
            return (f"{name} is {file.stat().st_size} bytes, but its save wrote {size} (listed in {COMPLETE_MARKER}: "
                    "the folder was changed after its save)")
    return None


def read_complete_marker(folder) -> dict | None:
    """A sharded folder's `complete.json` ({"global_step": int, "files": {name: bytes}}), None when it is missing
    or not one (JSON: reading it runs no code)."""
    try:
        marker = json.loads((Path(folder) / COMPLETE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or not isinstance(marker.get("global_step"), int) or \
            not isinstance(marker.get("files"), dict) or DCP_METADATA not in marker["files"] or \
            LIGHTNING_META not in marker["files"]:
        return None
    return marker


def write_complete_marker(folder, global_step: int) -> None:
    """Record that the save into `folder` is complete: every file it holds now, with its size (atomic)."""
    folder = Path(folder)
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != COMPLETE_MARKER}
    partial = folder / f".{COMPLETE_MARKER}{PARTIAL_MARK}{os.getpid()}"
    partial.write_text(json.dumps({"global_step": int(global_step), "files": files}, indent=1))
    os.replace(partial, folder / COMPLETE_MARKER)


def remove_complete_marker(folder) -> None:
    """Before a save rewrites `folder`: until the new marker exists, the folder counts as incomplete."""
    try:
        os.remove(Path(folder) / COMPLETE_MARKER)
    except (FileNotFoundError, NotADirectoryError):
        pass


def unreadable_message(path, problem: str) -> str:
    message = f"cannot resume from checkpoint {path}: {problem}."
    alternatives = [p for p in sibling_checkpoints(path) if os.path.abspath(p) != os.path.abspath(path)]
    if alternatives:
        message += f" The newest complete checkpoint next to it is {alternatives[0]}: pass it as --ckpt_path"
        message += " (or --ckpt_path last, which skips incomplete checkpoints)."
    else:
        message += " No complete checkpoint is next to it; start without --ckpt_path or pick another run's."
    return message


def sibling_checkpoints(path) -> list[str]:
    """Complete `*.ckpt` next to `path`, newest first."""
    folder = Path(path).parent
    found = [str(p) for p in folder.glob("*.ckpt") if checkpoint_problem(p) is None]
    return sorted(found, key=os.path.getmtime, reverse=True)
