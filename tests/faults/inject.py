"""Test-only callbacks and plugins that inject faults into a real `diffv2-lit fit` process. They are
given on the command line (`--trainer.callbacks+=tests.faults.inject.X`), never part of the package."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L

from diffv2_lit.checkpoint.atomic_io import AtomicCheckpointIO


class SlowSteps(L.Callback):
    """Sleeps `seconds` before every batch, so a signal sent during a step lands before its end."""

    def __init__(self, seconds: float = 1.0) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        time.sleep(self.seconds)


class StepMarker(L.Callback):
    """Writes the finished optimizer step count to `path` after every step (the test polls it)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        Path(self.path).write_text(str(trainer.global_step))


class RaiseMemoryError(L.Callback):
    """Raises MemoryError on the first step, as an allocation failing there would."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        raise MemoryError("injected: could not allocate 17179869184 bytes")


class NaNAtStep(L.Callback):
    """Makes the logits NaN in the forward pass of optimizer step `step` (so the loss and every gradient are
    NaN), and records a checksum of the weights before and after that step into `record`."""

    def __init__(self, step: int, record: str) -> None:
        self.step, self.record = step, record
        self.sums: dict[str, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        def poison(module, args, output):
            return output * float("nan") if trainer.global_step == self.step else output

        pl_module.model.register_forward_hook(poison)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            self.sums["before"] = _checksum(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step + 1:
            self._record_after(pl_module)

    def on_exception(self, trainer, pl_module, exception) -> None:
        if "before" in self.sums:  # the run stopped at the NaN step: the weights it leaves behind
            self._record_after(pl_module)

    def _record_after(self, pl_module) -> None:
        self.sums["after"] = _checksum(pl_module)
        Path(self.record).write_text(json.dumps(self.sums))


def _checksum(pl_module) -> float:
    return float(sum(p.detach().double().sum() for p in pl_module.parameters()))


class SlowAtomicCheckpointIO(AtomicCheckpointIO):
    """AtomicCheckpointIO that, from the `after`-th save on, pauses between writing the temporary file
    and renaming it, after touching `marker`: the test kills the process inside that window."""

    def __init__(self, marker: str, after: int = 2, pause_s: float = 60.0) -> None:
        super().__init__()
        self.marker, self.after, self.pause_s = marker, after, pause_s
        self.saves = 0

    def _write(self, checkpoint, partial) -> None:
        super()._write(checkpoint, partial)
        self.saves += 1
        if self.saves > self.after:
            Path(self.marker).write_text(str(partial))
            time.sleep(self.pause_s)


class SignalAtFitStart(L.Callback):
    """Sends `signal` to this process in `on_fit_start` on rank `rank`: after the model is built, before
    Lightning registers its own signal handlers and before training starts."""

    def __init__(self, signal: str = "SIGUSR1", rank: int = 0) -> None:
        self.signal, self.rank = signal, rank

    def on_fit_start(self, trainer, pl_module) -> None:
        import os
        import signal as signals

        if trainer.global_rank == self.rank:
            os.kill(os.getpid(), getattr(signals, self.signal))


class SignalAtStep(L.Callback):
    """Sends `signal` to this process at the end of optimizer step `step`, on rank `rank` only."""

    def __init__(self, step: int, signal: str = "SIGUSR1", rank: int = 0) -> None:
        self.step, self.signal, self.rank = step, signal, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        import os
        import signal as signals

        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            self.step = -1  # once
            os.kill(os.getpid(), getattr(signals, self.signal))


class SlowShardedWrites(L.Callback):
    """Makes every background (async) sharded save of optimizer step `at_step` (every step when None) sleep
    `seconds` in its writing thread, after touching `marker`; when the write is done it appends
    `{"save_step", "training_step"}` to `record` (JSON lines), the training step reached meanwhile."""

    def __init__(self, seconds: float, marker: str, record: str, at_step: int | None = None) -> None:
        self.seconds, self.marker, self.record, self.at_step = seconds, marker, record, at_step

    def on_fit_start(self, trainer, pl_module) -> None:
        from torch.distributed.checkpoint import FileSystemWriter

        saves = trainer.strategy.save_checkpoint  # diffv2_lit.checkpoint.atomic_io.MarkShardedSaves
        callback = self

        class SlowWriter(FileSystemWriter):
            def write_data(self, plan, planner):
                save_step = trainer.global_step
                if callback.at_step is None or save_step == callback.at_step:
                    Path(callback.marker).touch()
                    time.sleep(callback.seconds)
                with open(callback.record, "a") as f:
                    f.write(json.dumps({"save_step": save_step, "training_step": trainer.global_step}) + "\n")
                return super().write_data(plan, planner)

        saves.storage_writer = SlowWriter
