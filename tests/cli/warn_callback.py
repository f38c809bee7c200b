"""A callback for tests/cli/test_terminal.py: a warning in the middle of training, as a library would raise one."""

import warnings

import lightning as L


class WarnAtStep(L.Callback):
    def __init__(self, step: int = 3) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            warnings.warn(f"a warning raised at step {self.step}, mid-run")
