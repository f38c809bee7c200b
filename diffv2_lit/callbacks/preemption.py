"""`PreemptionCheckpoint`: on SIGTERM, SIGUSR1 or Ctrl-C, checkpoint at the next optimizer-step boundary and stop.

The callback installs its own handlers (why Lightning's own do not serve: docs/faults.md, "Preemption and SLURM"): SIGUSR1 (and SIGINT) at `setup`, before Lightning registers
its SLURM handler (which it then leaves alone), and all of them again at `on_train_start`, over
Lightning's SIGTERM handler. A handler only records the signal (and forwards it to child ranks like
Lightning does). Whether any rank was signalled travels as a flag in the module's one per-step reduction
(`DecoderLM.step_statistics`, no collective of its own; with another LightningModule, one all-reduce every
`check_every_n_steps` steps); at the end of that optimizer step every rank saves `last-preempted.ckpt`
into the checkpoint folder (found by `--ckpt_path last`) through the Trainer (atomic, sharded or not) and
stops. The run ends normally with exit code 0 (`diffv2-lit fit` exits 130 after a Ctrl-C). Under SLURM
with auto-requeue, rank 0 then requeues the job when any rank received the requeue signal.

Ctrl-C (SIGINT) is handled the same way (saved, then exit 130). A second Ctrl-C while the first is pending
stops at once, without saving, as a terminal user expects.
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

from diffv2_lit.callbacks.protocol import OncePerStep

PREEMPTED_NAME = "last-preempted.ckpt"  # matches `last*.ckpt`, the pattern `--ckpt_path last` searches


class PreemptionCheckpoint(L.Callback):
    """Save a resumable checkpoint and stop cleanly when the job is asked to end.

    Args:
        signals: signal names to act on. SIGTERM is what schedulers (SLURM, Kubernetes, torchrun)
            send before killing; SIGUSR1 is SLURM's early warning (`#SBATCH --signal=SIGUSR1@90`);
            SIGINT is Ctrl-C in a terminal.
        requeue: under SLURM with `SLURMEnvironment(auto_requeue=True)`, requeue the job after the
            save when any rank received SIGUSR1 (the environment's requeue signal).
        check_every_n_steps: with a LightningModule that has no `step_statistics` (DecoderLM has), how
            often the ranks agree on whether one was signalled (one all-reduce and host sync each time).
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR1", "SIGINT"),
                 requeue: bool = True, check_every_n_steps: int = 1) -> None:
        super().__init__()
        if isinstance(check_every_n_steps, bool) or not isinstance(check_every_n_steps, int) or check_every_n_steps < 1:
            raise ValueError(f"PreemptionCheckpoint: check_every_n_steps={check_every_n_steps!r} must be an integer >= 1.")
        self.signals = tuple(_signal_number(name) for name in signals)
        self.requeue = requeue
        self.check_every_n_steps = check_every_n_steps
        self.received: int | None = None  # the signal number, set by the handler
        self.saved_path: str | None = None
        self._step = OncePerStep()
        self._trainer: L.Trainer | None = None
        self._replaced: dict[int, object] = {}

    # ---- signal handling --------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._trainer = trainer
        # Before Lightning's signal connector: it installs its SLURM SIGUSR1 handler (a save from inside
        # the handler, at any point of a step) only where no handler is set yet.
        self._install(trainer, [s for s in self.signals if s != signal.SIGTERM])
        statistics = getattr(pl_module, "step_statistics", None)
        if statistics is not None:
            statistics.add_flag("preempted", lambda: self.received is not None)
            statistics.add_flag("requeue", lambda: self.received is not None and _is_requeue_signal(trainer, self.received))

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._step.seen = trainer.global_step
        self._trainer = trainer
        self._install(trainer, self.signals)  # over Lightning's SIGTERM handler, registered after setup
        if signal.SIGTERM in self.signals:
            _take_over_sigterm(trainer, self)

    def _install(self, trainer: L.Trainer, signals) -> None:
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn("PreemptionCheckpoint: not in the main thread, cannot install signal handlers.")
            return
        for signum in signals:
            previous = signal.signal(signum, self._on_signal)
            self._replaced.setdefault(signum, previous)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for signum, previous in self._replaced.items():  # Lightning restores only what it replaced itself
            if threading.current_thread() is threading.main_thread() and previous is not None:
                signal.signal(signum, previous)
        self._replaced = {}

    def _on_signal(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if signum == signal.SIGINT and self.received is None:
            print("\nCtrl-C: saving a checkpoint at the end of this step, then stopping (Ctrl-C again to stop "
                  "without saving)", file=sys.stderr, flush=True)
        if self.received is None and self._trainer is not None:
            # Like Lightning's handler: ranks started by this process (the subprocess launcher) get it too.
            launcher = getattr(self._trainer.strategy, "launcher", None)
            if launcher is not None and hasattr(launcher, "kill"):
                launcher.kill(signum)
        self.received = signum

    # ---- the step boundary ------------------------------------------------------------------

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self._step.first(trainer.global_step):
            return  # a micro-batch inside gradient accumulation: not a step boundary
        decision = self._decision(trainer, pl_module)
        if decision is None:
            return
        requeue = decision
        path = os.path.join(_checkpoint_dir(trainer), PREEMPTED_NAME)
        trainer.save_checkpoint(path, weights_only=False)  # the full state (Lightning warns when it is left unset)
        self.saved_path = path
        trainer.should_stop = True
        name = signal.Signals(self.received).name if self.received else "a signal on another rank"
        what = "interrupted (Ctrl-C)" if self.received == signal.SIGINT else f"preempted ({name})"
        rank_zero_info(f"{what} after step {trainer.global_step}: saved {path}; resume with --ckpt_path last")
        if self.requeue and requeue and trainer.is_global_zero:
            _requeue_slurm_job()

    def _decision(self, trainer: L.Trainer, pl_module: L.LightningModule) -> bool | None:
        """None: carry on. Else save and stop; True when the job is to be requeued. Identical on every rank."""
        result = getattr(pl_module, "last_step_result", None)
        if result is not None and result.step == trainer.global_step - 1 and "preempted" in result.flags:
            # DecoderLM reduced the flags with the step's other numbers: no collective here.
            return result.flags["requeue"] if result.flags["preempted"] else None
        if trainer.global_step % self.check_every_n_steps:
            return None
        if not trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            return None
        return trainer.strategy.reduce_boolean_decision(
            self.received is not None and _is_requeue_signal(trainer, self.received), all=False)

    # Nothing of this callback belongs in a checkpoint: a resumed run starts unsignalled.


def _take_over_sigterm(trainer: L.Trainer, callback: PreemptionCheckpoint) -> None:
    """From here on SIGTERM reaches this callback's handler only, so Lightning's own SIGTERM flag can no longer
    change; a SIGTERM Lightning saw before counts as ours. Lightning 2.6 also broadcasts that flag from rank 0
    and reads it on the host before *every micro-batch* of a multi-process run (`_broadcast_sigterm_tensor`):
    one collective and one host sync each, for a flag that is now constant. It is switched off here
    (tests/test_private_apis.py watches the name)."""
    if getattr(trainer, "received_sigterm", False) and callback.received is None:
        callback.received = signal.SIGTERM
    loop = trainer.fit_loop.epoch_loop
    if hasattr(loop, "_broadcast_sigterm_tensor"):
        loop._broadcast_sigterm_tensor = _no_broadcast


def _no_broadcast() -> None:
    """Lightning's per-batch SIGTERM broadcast, off (see `_take_over_sigterm`)."""


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
