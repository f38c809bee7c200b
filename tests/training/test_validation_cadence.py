"""Validation every N optimizer steps whatever the accumulation (callbacks/validation.py).

Lightning counts an integer `val_check_interval` in micro-batches: the GPU recipes' old
`val_check_interval: 8000  # every 1000 optimizer steps` at accumulation 8 became every 2000 steps when
examples/slurm_multinode.sbatch halved the accumulation. Real Trainers on CPU, validation observed as the
optimizer step at which each validation ran."""

import os
import re
from pathlib import Path

import lightning as L
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffv2_lit.callbacks.validation import ValidationInOptimizerSteps
from diffv2_lit.cli.fit import parse_config, run_lightning_cli
from tests.training.helpers import tiny_data, tiny_module, tiny_trainer

ROOT = Path(__file__).parents[2]
TINY = Path(__file__).with_name("configs") / "tiny.yaml"
SBATCH = ROOT / "examples" / "slurm_multinode.sbatch"


class ValidationSteps(L.Callback):
    def __init__(self) -> None:
        self.steps: list[int] = []

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self.steps.append(trainer.global_step)  # optimizer steps taken when validation ran


def _validation_steps(accumulation: int, val_check_interval: int, in_optimizer_steps: bool) -> list[int]:
    recorder = ValidationSteps()
    callbacks = [recorder, ValidationInOptimizerSteps()] if in_optimizer_steps else [recorder]
    trainer = tiny_trainer(max_steps=4, callbacks=callbacks, accumulate_grad_batches=accumulation, limit_val_batches=1,
                           val_check_interval=val_check_interval, check_val_every_n_epoch=None)
    trainer.fit(tiny_module(max_steps=4), tiny_data(batch_size=1))
    return recorder.steps


def _multinode_accumulation() -> int:
    return int(re.search(r"--trainer\.accumulate_grad_batches (\d+)", SBATCH.read_text()).group(1))


def test_the_multinode_jobs_halved_accumulation_keeps_the_cadence():
    """The 1.3b/6.7b recipes accumulate 8; the multi-node job overrides it with 4. With the recipes' callback,
    `val_check_interval: 2` validates after optimizer steps 2 and 4 under both."""
    recipe = parse_config([str(ROOT / "recipes/1.3b-diffv2.yaml")])
    multinode = parse_config([str(ROOT / "recipes/1.3b-diffv2.yaml"), str(ROOT / "configs/hardware/multinode.yaml")],
                             ["--trainer.accumulate_grad_batches", str(_multinode_accumulation())])
    assert (recipe.trainer.accumulate_grad_batches, multinode.trainer.accumulate_grad_batches) == (8, 4)
    assert multinode.trainer.val_check_interval == recipe.trainer.val_check_interval == 1000

    for accumulation in (8, 4):
        assert _validation_steps(accumulation, 2, in_optimizer_steps=True) == [2, 4]
    # Lightning's own meaning, as the recipes had it (2 x 8 micro-batches = 2 steps at accumulation 8):
    # the halved accumulation validates at every step instead.
    assert _validation_steps(8, 16, in_optimizer_steps=False) == [2, 4]
    assert _validation_steps(4, 16, in_optimizer_steps=False) == [4]


def test_global_batch_size_through_the_cli_keeps_the_cadence(tmp_path, monkeypatch):
    """`--global_batch_size` sets the accumulation after the config is parsed (here 16 = 4 x 1 device x 4):
    validation still runs every 2 optimizer steps. Read back from the logged val/loss, whose TensorBoard step
    is that of the last train/loss before it (optimizer step k logs at k - 1)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFV2_LIT_CACHE", str(tmp_path / "cache"))
    cli = run_lightning_cli(["fit", "--config", str(TINY), "--trainer.max_steps", "4", "--global_batch_size", "16",
                             "--trainer.val_check_interval", "2", "--trainer.check_val_every_n_epoch", "null",
                             "--trainer.callbacks+=diffv2_lit.callbacks.validation.ValidationInOptimizerSteps"])
    assert cli.trainer.accumulate_grad_batches == 4
    events = EventAccumulator(str(tmp_path / "runs" / "tiny" / "version_0"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2, 3]
    assert [e.step for e in events.Scalars("val/loss")] == [1, 3]  # after optimizer steps 2 and 4


@pytest.mark.parametrize("interval", [0.5, 1.0])
def test_an_epoch_fraction_keeps_lightnings_meaning(interval):
    trainer = tiny_trainer(max_steps=2, callbacks=[ValidationInOptimizerSteps()], accumulate_grad_batches=2,
                           val_check_interval=interval)
    trainer.fit(tiny_module(max_steps=4), tiny_data(batch_size=1, train_batches=4))
    assert trainer.val_check_interval == interval
