"""`PreemptionCheckpoint`: on SIGTERM, SIGUSR1 or Ctrl-C, checkpoint at the next optimizer-step boundary and stop.

What Lightning 2.6 does by itself (trainer/connectors/signal_connector.py, loops/*.py):
- SIGTERM sets `trainer.received_sigterm`; the loops then raise `SIGTERMException` (a SystemExit) at
  the start of the next step, at the end of a step, in the middle of validation or at the epoch end,
  without saving anything. Its handler also runs a `dist.broadcast` inside the signal handler.
- Under SLURM with `SLURMEnvironment(auto_requeue=True)` (the default when SLURM is detected), SIGUSR1
  saves `hpc_ckpt_<n>.ckpt` into `default_root_dir` from inside the signal handler, i.e. at whatever
  point of the step the signal lands, then runs `scontrol requeue`. `--ckpt_path last` does not see it.

So while training runs (from `on_train_start` until Lightning's teardown restores the handlers) this
callback installs its own handlers for those signals. A handler only sets a flag (and forwards the
signal to child ranks like Lightning does); at the end of the next optimizer step every rank learns
whether any rank was signalled (one all-reduce), all save `last-preempted.ckpt` into the checkpoint
folder (found by `--ckpt_path last`) through the Trainer (atomic, sharded or not), and stop. The run
ends normally with exit code 0. Under SLURM with auto-requeue, rank 0 then requeues the job.

Ctrl-C (SIGINT) is handled the same way: Lightning would otherwise turn it into a KeyboardInterrupt, a
"graceful shutdown" that saves nothing and exits 1. A second Ctrl-C while the first is pending stops at
once, without saving, as a terminal user expects.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

PREEMPTED_NAME = "last-preempted.ckpt"  # matches `last*.ckpt`, the pattern `--ckpt_path last` searches


class PreemptionCheckpoint(L.Callback):
    """Save a resumable checkpoint and stop cleanly when the job is asked to end.

    Args:
        signals: signal names to act on. SIGTERM is what schedulers (SLURM, Kubernetes, torchrun)
            send before killing; SIGUSR1 is SLURM's early warning (`#SBATCH --signal=SIGUSR1@90`);
            SIGINT is Ctrl-C in a terminal.
        requeue: under SLURM with `SLURMEnvironment(auto_requeue=True)`, requeue the job after the
            save when SIGUSR1 (the environment's requeue signal) was received.
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1", "SIGINT"),
                 requeue: bool = True) -> None:
        super().__init__()
        self.signals = tuple(_signal_number(name) for name in signals)
        self.requeue = requeue
        self.received: int | None = None  # the signal number, set by the handler
        self.saved_path: str | None = None
        self._last_step = -1
        self._installed = False

    # ---- signal handling --------------------------------------------------------------------

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step
        self._trainer = trainer
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, cannot install signal handlers.")
            return
        for signum in self.signals:
            signal.signal(signum, self._on_signal)  # Lightning's teardown restores the original handlers
        self._installed = True

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if signum == signal.SIGINT and self.received is None:
            print("\nCtrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to stop "
                  "without saving)", file=sys.stderr, flush=True)
        if self.received is None:
            # Like Lightning's handler: ranks started by this process (the subprocess launcher) get it too.
            launcher = getattr(self._trainer.strategy, "launcher", None)
            if launcher is not None and hasattr(launcher, "kill"):
                launcher.kill(signum)
        self.received = signum

    # ---- the step boundary ------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last_step:
            return  # a micro-batch inside gradient accumulation: not a step boundary
        self._last_step = trainer.global_step
        # Every rank takes part, so every rank takes the same decision (identity on one device).
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return
        path = os.path.join(_checkpoint_dir(trainer), PREEMPTED_NAME)
        trainer.save_checkpoint(path)
        self.saved_path = path
        trainer.should_stop = True
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        what = "interrupted (Ctrl-C)" if self.received == signal.SIGINT else f"preempted ({name})"
        rank_zero_info(f"{what} after step {trainer.global_step}: saved {path}; resume with --ckpt_path last")
        if self.requeue and self.received is not None and _is_requeue_signal(trainer, self.received):
            if trainer.is_global_zero:
                _requeue_slurm_job()

    # Nothing of this callback belongs in a checkpoint: a resumed run starts unsignalled.


def _signal_number(name: str | int) -> int:
    if isinstance(name, int):
        return name
    try:
        return int(getattr(signal.Signals, name.upper()))
    except AttributeError:
        raise ValueError(f"PreemptionCheckpoint: unknown signal {name!r}; use names like 'SIGTERM', 'SIGUSR1'.") from None


def _checkpoint_dir(trainer: L.Trainer) -> str:
    """The ModelCheckpoint folder, else `<log_dir>/checkpoints` (ModelCheckpoint's own default)."""
    callback = trainer.checkpoint_callback
    if callback is not None and getattr(callback, "dirpath", None):
        return callback.dirpath
    return os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")


def _is_requeue_signal(trainer: L.Trainer, signum: int) -> bool:
    environment = trainer._accelerator_connector.cluster_environment
    return (isinstance(environment, SLURMEnvironment) and environment.auto_requeue
            and signum == int(environment.requeue_signal))


def _requeue_slurm_job() -> None:
    """`scontrol requeue <job>`, as Lightning's SLURM handler does."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        rank_zero_warn(f"PreemptionCheckpoint: no usable SLURM job id ({job!r}); not requeueing.")
        return
    result = subprocess.call(["scontrol", "requeue", job])
    if result == 0:
        rank_zero_info(f"requeued SLURM job {job}")
    else:
        rank_zero_warn(f"PreemptionCheckpoint: `scontrol requeue {job}` failed with exit code {result}.")
