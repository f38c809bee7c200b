"""Crafted checkpoints: real checkpoints with one object added whose unpickling runs a shell command.

The payload is the one from issue 16, `os.system("touch <marker>")`, aimed at a file in the test's
tmp_path: harmless, and observable (the marker exists if and only if the code ran).
"""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
import shlex
import shutil
from pathlib import Path

import torch

from diffv2_lit.checkpoint.layout import write_complete_marker

EVIL_GLOBAL = "posix.system"  # how pickle names os.system on Linux


class TouchMarker:
    """Unpickles as `os.system("touch <marker>")`."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def crafted_file(source: Path, target: Path, marker: Path) -> Path:
    """A copy of the single-file checkpoint `source` with the payload in its hyper_parameters."""
    checkpoint = torch.load(source, weights_only=True)
    checkpoint["hyper_parameters"]["note"] = TouchMarker(marker)
    torch.save(checkpoint, target)
    return target


def crafted_folder(source: Path, target: Path, marker: Path, where: str) -> Path:
    """A copy of the sharded checkpoint folder `source` with the payload in one of its pickled parts:
    'meta.pt' (Lightning's hyper-parameters and loop state), 'index' (torch.distributed.checkpoint's
    `.metadata`) or 'item' (a non-tensor item of a shard: the first optimizer group's learning rate)."""
    shutil.copytree(source, target)
    {"meta.pt": _in_meta_pt, "index": _in_index, "item": _in_item}[where](target, TouchMarker(marker))
    write_complete_marker(target, global_step=0)  # as by a complete save: the folder looks complete
    return target


def _in_meta_pt(folder: Path, payload: TouchMarker) -> None:
    meta = torch.load(folder / "meta.pt", weights_only=True)
    meta["hyper_parameters"]["note"] = payload
    torch.save(meta, folder / "meta.pt")


def _in_index(folder: Path, payload: TouchMarker) -> None:
    index = _read_index(folder)
    index.planted = payload
    (folder / ".metadata").write_bytes(pickle.dumps(index))


def _in_item(folder: Path, payload: TouchMarker, fqn: str = "optimizer_0.param_groups.0.lr") -> None:
    """Append the pickled payload to the shard holding `fqn` and point the index at it."""
    index = _read_index(folder)
    key = next(k for k in index.storage_data if k.fqn == fqn)
    where = index.storage_data[key]
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    shard = folder / where.relative_path
    offset = shard.stat().st_size
    with open(shard, "ab") as f:
        f.write(buffer.getvalue())
    index.storage_data[key] = dataclasses.replace(where, offset=offset, length=len(buffer.getvalue()))
    (folder / ".metadata").write_bytes(pickle.dumps(index))


def _read_index(folder: Path):
    # The test's own, trusted, file: plain pickle is what torch itself uses to read it.
    return pickle.loads((folder / ".metadata").read_bytes())
