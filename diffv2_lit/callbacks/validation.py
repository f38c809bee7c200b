"""Validation every N optimizer steps, whatever the gradient accumulation.

Lightning counts an integer `trainer.val_check_interval` in training batches, which are micro-batches under
gradient accumulation: `val_check_interval: 8000` meant 1000 optimizer steps at `accumulate_grad_batches: 8`
and silently became 2000 when a multi-node job halved the accumulation (examples/slurm_multinode.sbatch) or
`--global_batch_size` changed it. With this callback in the list, the integer counts optimizer steps:

    trainer:
      val_check_interval: 1000   # optimizer steps (ValidationInOptimizerSteps below)
      check_val_every_n_epoch: null
      callbacks:
        - class_path: diffv2_lit.callbacks.validation.ValidationInOptimizerSteps

At the start of `fit` (after `--global_batch_size` has set the accumulation) it hands Lightning
`val_check_interval x accumulate_grad_batches` micro-batches, so validation runs right after every N-th
optimizer step. A fraction of an epoch or a duration keeps Lightning's meaning.
"""

from __future__ import annotations

import lightning as L


class ValidationInOptimizerSteps(L.Callback):
    def __init__(self) -> None:
        self.every_n_steps: int | None = None  # as configured, kept for a later `fit` on the same Trainer

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if self.every_n_steps is None:
            interval = trainer.val_check_interval
            if isinstance(interval, bool) or not isinstance(interval, int):
                return
            self.every_n_steps = interval
        trainer.val_check_interval = self.every_n_steps * trainer.accumulate_grad_batches


def validation_every_n_steps(val_check_interval, accumulation: int, in_optimizer_steps: bool) -> float | None:
    """Optimizer steps between validations for an integer `val_check_interval` (None for Lightning's other
    forms: a fraction of an epoch, a duration). Without the callback Lightning counts micro-batches."""
    if isinstance(val_check_interval, bool) or not isinstance(val_check_interval, int):
        return None
    return float(val_check_interval) if in_optimizer_steps else val_check_interval / accumulation
