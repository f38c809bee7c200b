"""What a pretraining run shows while it trains: one bar in optimizer steps for the whole run.

Lightning's bars count micro-batches per epoch. A pretraining run streams an endless dataset in one
"epoch", so they read "Epoch 0/-2", count accumulated micro-batches ("1250/49" after a resume) and show
the logger's version number as a metric. `StepProgressBar` shows instead:

    train  41%|████▏     | 492/1200 [01:10<01:41, 7.0 step/s, loss=1.98, tok/s=14.3k, val=1.97]

step / max_steps (resumed runs start where they stopped), the training loss, tokens/s from
`ThroughputMFU` when it runs, the last validation loss, and tqdm's elapsed time and ETA. Each validation
also leaves one line above the bar, so the curve stays on screen:

    validation at step 400: val/loss 1.98, val/ppl 7.243 (01:06 into training)

While the bar is drawn, warnings and Lightning's log lines are written above it (tqdm.write) instead of
after it on its own line, where they were glued to it (`...val=1.96]UserWarning: ...`), and the closing
bar is drawn once.
"""

from __future__ import annotations

import logging
import math
import sys
import warnings
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

# Where Lightning's (and the root logger's) console handlers sit; their lines go above the bar while it is drawn.
LOGGERS = ("lightning.pytorch", "lightning.fabric", "")


class StepProgressBar(TQDMProgressBar):
    """A TQDM bar over optimizer steps (`trainer.global_step` of `trainer.max_steps`)."""

    def init_train_tqdm(self):
        bar = super().init_train_tqdm()
        bar.unit = "step"
        return bar

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._reset_to_steps(trainer)
        if trainer.is_global_zero and not self.train_progress_bar.disable:
            self._write_above_the_bar()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_writing_above_the_bar()
        super().on_train_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_writing_above_the_bar()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_writing_above_the_bar()
        super().teardown(trainer, pl_module, stage)

    def _write_above_the_bar(self) -> None:
        """Route warnings and console log lines through tqdm.write (it clears the bar, writes the line, redraws)."""
        if getattr(self, "_restore", None) is not None:
            return
        showwarning = warnings.showwarning
        redirect = logging_redirect_tqdm(loggers=[logging.getLogger(name) for name in LOGGERS], tqdm_class=tqdm)
        redirect.__enter__()

        def show(message, category, filename, lineno, file=None, line=None):
            text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
            tqdm.write(text, file=file or sys.stderr)

        warnings.showwarning = show

        def restore() -> None:
            warnings.showwarning = showwarning
            redirect.__exit__(None, None, None)

        self._restore = restore

    def _stop_writing_above_the_bar(self) -> None:
        restore, self._restore = getattr(self, "_restore", None), None
        if restore is not None:
            restore()

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:
        if self.train_progress_bar.total != _max_steps(trainer):  # one bar for the run, not one per epoch
            self._reset_to_steps(trainer)

    def _reset_to_steps(self, trainer: L.Trainer) -> None:
        bar = self.train_progress_bar
        bar.reset(total=_max_steps(trainer))
        bar.initial = bar.n = trainer.global_step  # a resumed run continues its count (and its ETA)
        bar.set_description("train")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step != self.train_progress_bar.n and self._should_update(step, self.train_progress_bar.total):
            self.train_progress_bar.n = step
            self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module))  # refreshes the bar

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pass  # the bar spans epochs

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        value = trainer.callback_metrics.get("val/loss")
        if value is not None:
            self._val_loss = float(value)  # read once per validation, not at every refresh of the bar
        if value is not None and trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.is_global_zero:
            self._print_validation(trainer)

    def _print_validation(self, trainer: L.Trainer) -> None:
        """One line per validation, above the bar: the bar's `val=` shows only the last one."""
        # val/ppl is exp(val/loss) (DecoderLM): computed here, not read from the device a second time
        line = f"validation at step {trainer.global_step}: val/loss {self._val_loss:.4g}, " \
               f"val/ppl {math.exp(min(self._val_loss, 700.0)):.4g}"
        bar = self._train_progress_bar
        if bar is not None and not bar.disable:
            line += f" ({tqdm.format_interval(bar.format_dict['elapsed'])} into training)"
        tqdm.write(line, file=bar.fp if bar is not None and not bar.disable else sys.stdout)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Host numbers only (no device tensor is read here): the module's last step result, the
        throughput callback's last window, the last validation loss."""
        shown: dict[str, Any] = {}
        result = getattr(pl_module, "last_step_result", None)
        if result is not None:
            shown["loss"] = f"{result.loss:.3g}"
        tokens_per_sec = next((c.last_metrics.get("perf/tokens_per_sec") for c in trainer.callbacks
                               if isinstance(getattr(c, "last_metrics", None), dict)), None)
        if tokens_per_sec is not None:
            shown["tok/s"] = _si(tokens_per_sec)
        if getattr(self, "_val_loss", None) is not None:
            shown["val"] = f"{self._val_loss:.3g}"
        return shown


def _max_steps(trainer: L.Trainer) -> int | None:
    return trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None


def _si(value: float) -> str:
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"
