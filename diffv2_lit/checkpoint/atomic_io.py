"""Crash-safe checkpoint files, and telling a complete checkpoint from a half-written one.

Lightning 2.6's `TorchCheckpointIO` serialises the whole checkpoint into memory, writes it to a
`tempfile.mkstemp()` file in the system temp folder and `shutil.move`s it into place (fsspec's
transaction). When /tmp is another filesystem the move is a copy, in place, so a kill during it
leaves a truncated file under the final name; nothing is fsynced, and a killed run leaves a
checkpoint-sized orphan in /tmp. `AtomicCheckpointIO` writes next to the target instead:

    <dir>/.<name>.partial-<host>-<pid>   torch.save, flush, fsync
    os.replace -> <dir>/<name>    atomic on POSIX: readers see the old file or the new one
    fsync(<dir>)                  the rename itself survives a power loss

The temporary name starts with a dot and does not end in `.ckpt`, so no `*.ckpt` search (Lightning's
or `find_last_checkpoint`'s) ever matches it. Loads read data only (`safe_load.load_file`:
weights_only=True and the project's allow-list, whatever `weights_only` Lightning passes). Sharded
(FSDP2) checkpoints are folders written by torch.distributed.checkpoint and never pass through a
CheckpointIO: `MarkShardedSaves` marks each folder complete once every rank has written its part,
and `checkpoint_problem` takes only marked folders.

Each save removes the temporary files of its own name that a killed process left, but only those
of a process that no longer runs on this host: two runs writing one folder never delete each
other's file in progress.
"""

from __future__ import annotations

import errno
import glob
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from diffv2_lit.checkpoint.errors import CheckpointError
from diffv2_lit.checkpoint.layout import (LIGHTNING_META, PARTIAL_MARK, checkpoint_problem, is_sharded,
                                          remove_complete_marker, write_complete_marker)
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
        partial = path.with_name(f".{path.name}{PARTIAL_MARK}{_HOST}-{os.getpid()}")
        try:
            self._write(checkpoint, partial)
            os.replace(partial, path)
        except (OSError, RuntimeError) as err:  # torch.save reports a full disk as "unexpected pos N vs M"
            needed = _checkpoint_bytes(checkpoint)
            if not _is_disk_full(err, path.parent, needed):
                raise
            raise CheckpointError(_disk_full_message(path, needed)) from None
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
        if is_sharded(path) and checkpoint_problem(path) is None:
            raise CheckpointError(_sharded_under_another_strategy(path))
        return load_complete(path, map_location=map_location)


def _sharded_under_another_strategy(path) -> str:
    """Only ModelParallelStrategy resumes a sharded folder; every other strategy loads through a CheckpointIO."""
    return (f"cannot resume from checkpoint {path}: it is a sharded FSDP2 folder, which only FSDP2 resumes. Resume "
            "it under lightning.pytorch.strategies.ModelParallelStrategy (--config configs/hardware/8gpu-fsdp2.yaml, "
            "any device count), or convert it into one file with `diffv2-lit consolidate --with-optimizer "
            f"{path} merged.ckpt` and resume from merged.ckpt under this strategy.")


_HOST = socket.gethostname().replace("-", "_") or "host"


def _remove_stale_partials(path: Path) -> None:
    """Temp files of this checkpoint name left by a killed process of this host (never a running one's)."""
    for stale in glob.glob(str(path.with_name(f".{path.name}{PARTIAL_MARK}*"))):
        host, _, pid = stale.rpartition(PARTIAL_MARK)[2].rpartition("-")
        if host != _HOST or not pid.isdigit() or _is_running(int(pid)):
            continue
        try:
            os.remove(stale)
        except FileNotFoundError:
            pass


def _checkpoint_bytes(checkpoint: Any) -> int:
    """About what torch.save writes: every tensor storage once (a few KiB of pickle on top)."""
    storages: dict[int, int] = {}

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)
        elif isinstance(value, (list, tuple)):
            for item in value:
                visit(item)

    visit(checkpoint)
    return sum(storages.values()) + 64 * 1024


def _is_disk_full(err: BaseException, folder: Path, needed: int) -> bool:
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return True
    return shutil.disk_usage(folder).free < needed  # torch's writer names no errno: judge by the free space


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, device) holding `path`, from /proc/mounts where there is one."""
    target, best = os.path.realpath(path), ("/", "the disk")
    try:
        with open("/proc/mounts") as mounts:
            for line in mounts:
                device, point = line.split()[:2]
                if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                    best = (point, device)
    except OSError:
        pass
    return best


def _disk_full_message(path: Path, needed: int) -> str:
    from diffv2_lit.checkpoint.resume import latest_complete

    point, device = _mount_of(path.parent)
    free = shutil.disk_usage(path.parent).free
    message = (f"no space left on {point} ({device}) to save checkpoint {path}: it needs about {needed / 2**20:.1f} "
               f"MiB and {free / 2**20:.1f} MiB are free; nothing was overwritten. ")
    last = latest_complete(path.parent)
    if last is None:
        return message + "No complete checkpoint is in that folder yet: free space and start again."
    return message + (f"The last complete checkpoint, {last.path} (step {last.step}), is intact: free space (or set "
                      f"ModelCheckpoint's dirpath on another disk) and resume with --ckpt_path {last.path}.")


def _is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class MarkShardedSaves:
    """Wraps `strategy.save_checkpoint` so that a sharded (FSDP2) folder carries `complete.json` exactly when its
    save finished on every rank, and (`asynchronous`, the default) writes sharded saves in the background.

    Synchronous: rank 0 removes the folder's marker before the save (the path broadcast that opens
    ModelParallelStrategy's save orders it before any rank writes), and writes it after
    (torch.distributed.checkpoint's save returns on rank 0 once every rank's shards are written, and rank 0
    writes meta.pt itself).

    Asynchronous (`torch.distributed.checkpoint.async_save`): each rank copies its shards to host memory,
    which is all the training step waits for, and a background thread writes them, coordinated over a gloo
    group of its own (NCCL collectives must not run from a second thread). Rank 0's write finishes only after
    every rank's has (DCP gathers the ranks' write results before rank 0 writes `.metadata`), so rank 0 writes
    the marker when its write is done: at the next step end (`poll`), before a later save (one step's saves
    in flight at a time, and never two into one folder) and when training ends (`wait`). Until then the folder
    has no marker: `--ckpt_path last` never picks a save in flight, and a process killed during the write
    leaves the previous checkpoint as the one that resumes.

    A class, not a closure: strategies are pickled for spawned workers."""

    def __init__(self, save_checkpoint, asynchronous: bool = False) -> None:
        self.save_checkpoint = save_checkpoint
        self.strategy = save_checkpoint.__self__
        self.asynchronous = asynchronous
        self.storage_writer = None  # a FileSystemWriter class; tests inject a slow one (tests/faults/inject.py)
        self.in_flight: list[_SaveInFlight] = []
        self._groups: list = []  # gloo process groups for the background writes, one per save slot of a step
        self._saves_this_step = (None, -1)

    @classmethod
    def install(cls, strategy, asynchronous: bool = False) -> "MarkShardedSaves":
        if not isinstance(strategy.save_checkpoint, cls):
            strategy.save_checkpoint = cls(strategy.save_checkpoint, asynchronous)
        strategy.save_checkpoint.asynchronous = asynchronous
        return strategy.save_checkpoint

    def __getstate__(self) -> dict:
        return {**self.__dict__, "in_flight": [], "_groups": []}

    def __call__(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        if self.asynchronous and self._writes_sharded():
            return self._save_in_background(checkpoint, filepath)
        self.wait()
        step, rank_zero = checkpoint.get("global_step", 0), self.strategy.global_rank == 0
        if rank_zero and os.path.isdir(filepath):
            remove_complete_marker(filepath)
        self.save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if rank_zero and os.path.isdir(filepath):  # a sharded save (a file save replaces a folder by a file)
            write_complete_marker(filepath, step)

    def _writes_sharded(self) -> bool:
        from lightning.pytorch.strategies import ModelParallelStrategy

        # tests/test_private_apis.py: Lightning keeps the choice in a private attribute
        return isinstance(self.strategy, ModelParallelStrategy) and self.strategy._save_distributed_checkpoint

    def _save_in_background(self, checkpoint: dict[str, Any], filepath) -> None:
        """ModelParallelStrategy.save_checkpoint's sharded branch, with async_save instead of save."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import FileSystemWriter

        path = Path(self.strategy.broadcast(str(filepath)))
        step = checkpoint.get("global_step", 0)
        self.wait(lambda save: save.step != step or save.path == path)
        rank_zero = self.strategy.global_rank == 0
        if rank_zero:
            if path.is_file():
                path.unlink()
            path.mkdir(parents=True, exist_ok=True)
            remove_complete_marker(path)
        self.strategy.barrier("diffv2_lit_async_save")  # the folder exists and is unmarked before any rank writes
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))})
        # Each save in flight writes from its own thread; two threads sharing one process group could
        # interleave their collectives differently on two ranks and hang. The k-th save of a step uses group
        # k: the same on every rank (saves of earlier steps were waited for above), created collectively here.
        self._saves_this_step = (step, self._saves_this_step[1] + 1 if self._saves_this_step[0] == step else 0)
        slot = self._saves_this_step[1]
        while len(self._groups) <= slot:
            self._groups.append(dist.new_group(backend="gloo"))
        writer = (self.storage_writer or FileSystemWriter)(path)
        future = dcp.async_save(state, storage_writer=writer, process_group=self._groups[slot])
        if rank_zero:
            torch.save(checkpoint, path / LIGHTNING_META)
        self.in_flight.append(_SaveInFlight(path, step, future))

    def poll(self) -> None:
        """Mark every background save that has finished (no waiting, no collective)."""
        for save in [s for s in self.in_flight if s.future.done()]:
            self._finish(save)

    def wait(self, which=lambda save: True) -> None:
        """Block until the chosen background saves are written, and mark them."""
        for save in [s for s in self.in_flight if which(s)]:
            self._finish(save)

    def _finish(self, save: "_SaveInFlight") -> None:
        self.in_flight.remove(save)
        try:
            save.future.result()
        except Exception as err:
            raise CheckpointError(f"the background save of checkpoint {save.path} (step {save.step}) failed: "
                                  f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}. "
                                  f"It does not count as a checkpoint; the previous complete one resumes.") from err
        if self.strategy.global_rank == 0:
            write_complete_marker(save.path, save.step)


class _SaveInFlight:
    def __init__(self, path: Path, step: int, future) -> None:
        self.path, self.step, self.future = path, step, future


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
