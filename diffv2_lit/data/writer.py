"""LitData's `optimize` in a process group of its own, under a watchdog (issue 24.2).

On a full disk LitData's writer deadlocks (a worker's chunk write fails with ENOSPC and the parent waits for
it forever: 3 of 3 runs with the default 64 MB chunks), and its exits left 1-2 of its processes behind. So
`optimize` runs in a child process that leads a process group of its own, and the caller's process watches:

- the output's file system (a local output): when it stays full (under FULL_BYTES free) with nothing written
  for STALL_S seconds, the run is stopped with `NoSpaceError`, one line naming the device and the space;
- however the child ends (done, failed, stopped, the caller interrupted), every process of its group ends too;
- the child ends its group when the caller dies (SIGKILL of `prepare`), so nothing is left running.

The child's own error comes back through a pipe (no file: the disk may be full). Being a process of its
own, it also keeps LitData's seeding (`random`, NumPy and torch seeded with 42 in `optimize`) away from the
caller's generators: preparing the built-in corpus inside `fit` once changed the model's initialisation.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from diffv2_lit.errors import DiffV2Error

POLL_S = 0.2
STALL_S = 5.0  # a full disk with nothing written for this long: the writer is stuck
FULL_BYTES = 1 << 20
GROUP_GRACE_S = 3.0


class NoSpaceError(DiffV2Error, RuntimeError):
    """The output's file system filled up while writing; the message names it and the space (exit 1)."""


def run_in_group(fn, kwargs: dict, watch_dir: Path | None) -> None:
    """`fn(**kwargs)` in a child process leading its own process group; returns when it succeeded, raises
    RuntimeError with its error otherwise (NoSpaceError for a full `watch_dir` file system)."""
    if not hasattr(os, "killpg"):  # no process groups (Windows): no watchdog either
        fn(**kwargs)
        return
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(fn, kwargs, send, os.getpid()), name="diffv2-prepare-writer")
    child.start()
    send.close()
    with contextlib.suppress(OSError):  # the child does the same: whichever runs first
        os.setpgid(child.pid, child.pid)
    try:
        _watch(child, watch_dir)
    finally:
        end_group(child)
    error = receive.recv() if receive.poll() else "the writer process ended without a word"
    if error is not None or child.exitcode != 0:
        raise RuntimeError(error or f"the writer process exited with {child.exitcode}")


def _child(fn, kwargs: dict, send, parent: int) -> None:
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    threading.Thread(target=_end_group_when_orphaned, args=(parent,), daemon=True).start()
    try:
        fn(**kwargs)
    except BaseException as err:  # noqa: BLE001 - reported to the parent, which raises it
        send.send(f"{type(err).__name__}: {err}")
        raise SystemExit(1) from None
    send.send(None)


def _end_group_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os.killpg(0, signal.SIGKILL)  # the caller is gone: nobody will read what this group writes


def _watch(child, watch_dir: Path | None) -> None:
    free, changed = _free(watch_dir), time.monotonic()
    while child.is_alive():
        child.join(POLL_S)
        now_free = _free(watch_dir)
        if now_free != free:
            free, changed = now_free, time.monotonic()
        elif free is not None and free < FULL_BYTES and time.monotonic() - changed > STALL_S:
            usage = shutil.disk_usage(watch_dir)
            raise NoSpaceError(f"no space left on {_mount_point(watch_dir)} ({usage.free / 2**20:.1f} MiB free of "
                               f"{usage.total / 2**20:.1f} MiB)")


def _free(folder: Path | None) -> int | None:
    if folder is None:
        return None
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _mount_point(path: Path) -> str:
    path = Path(path).resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return str(path)


def end_group(child) -> None:
    """End every process of the child's group: SIGTERM, a grace for the child to stop, then SIGKILL for what
    is left (LitData's helpers do not always stop with it)."""
    _killpg(child.pid, signal.SIGTERM)
    child.join(GROUP_GRACE_S)
    _killpg(child.pid, signal.SIGKILL)
    child.join()


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # no process left in the group
        os.killpg(pgid, sig)
