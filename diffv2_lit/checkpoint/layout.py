"""Where checkpoints live and how to tell a complete one from a half-written one. The one place that
knows the on-disk layout:

    <name>.ckpt                  a Lightning checkpoint file (torch.save, a zip archive)
    <name>.ckpt/                 a sharded checkpoint folder (FSDP2 under ModelParallelStrategy):
        __<rank>_0.distcp          torch.distributed.checkpoint shards, one per rank
        .metadata                  their index, written after every shard
        meta.pt                    Lightning's non-tensor part (hyper-parameters, loops, callbacks), last
    .<name>.partial-<pid>        a file AtomicCheckpointIO is still writing (never matches `*.ckpt`)
    <export>/config.json         a `diffv2-lit export` folder, with `*.safetensors` beside it
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

PARTIAL_MARK = ".partial-"
DCP_METADATA = ".metadata"   # torch.distributed.checkpoint writes it after every shard
LIGHTNING_META = "meta.pt"   # ModelParallelStrategy writes it (rank 0) after the shards
EXPORT_CONFIG = "config.json"


def is_sharded(path) -> bool:
    return Path(path).is_dir() and (Path(path) / DCP_METADATA).is_file()


def is_export(path) -> bool:
    return Path(path).is_dir() and (Path(path) / EXPORT_CONFIG).is_file()


def checkpoint_problem(path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it looks complete. Cheap: reads no tensors.

    - a file: torch.save's zip format ends with a central directory, which a truncated file lacks;
    - a sharded folder: `.metadata` and `meta.pt` must exist, `meta.pt` must be complete and be the
      newest file (shards newer than it mean a save that was rewriting the folder was interrupted).
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
    if not (folder / DCP_METADATA).is_file():
        return f"the sharded folder has no {DCP_METADATA} (the save was interrupted)"
    meta = folder / LIGHTNING_META
    if not meta.is_file():
        return f"the sharded folder has no {LIGHTNING_META} (the save was interrupted)"
    if not zipfile.is_zipfile(meta):
        return f"{LIGHTNING_META} is truncated (the save was interrupted)"
    newest_shard = max((p.stat().st_mtime for p in folder.iterdir() if p.name != LIGHTNING_META), default=0.0)
    if newest_shard > meta.stat().st_mtime:
        return f"shards are newer than {LIGHTNING_META}: a save rewriting this folder was interrupted"
    return None


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
