"""GradientSpikeDetector on real (tiny) Trainer runs: injected spikes, actions, resume, no false alarms."""

from __future__ import annotations

import glob
import json
import math
import os

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.callbacks.conftest import TinyLM, fast_trainer, token_loader
from diffv2_lit.callbacks import GradientSpikeDetector
from diffv2_lit.callbacks.spike import EmaStats, MedianStats
from diffv2_lit.checkpoint.safe_load import load_file


def read_spikes(log_dir) -> list[dict]:
    path = os.path.join(log_dir, "spikes.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


def scalars(log_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_same_state(before: dict, after: dict) -> None:
    for key, value in before["weights"].items():
        assert torch.equal(value, after["weights"][key]), key
    assert before["optimizer"].keys() == after["optimizer"].keys()
    for i, state in before["optimizer"].items():
        for key, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["optimizer"][i][key])), (i, key)


@pytest.mark.parametrize("kwargs, message", [
    ({"action": "explode"}, "action='explode' is unknown"),
    ({"method": "mean"}, "method='mean' is unknown"),
    ({"factor": None, "z": None}, "both None"),
    ({"factor": 0.5}, "must be > 1"),
    ({"z": -1.0}, "must be > 0"),
    ({"warmup": -1}, "warmup=-1"),
    ({"window": 0}, "window=0"),
    ({"ema_decay": 1.0}, "ema_decay=1.0"),
])
def test_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientSpikeDetector(**kwargs)


def test_injected_gradient_spike_is_flagged_at_that_step_only(tmp_path):
    detector = GradientSpikeDetector(warmup=30)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    # Clipping as in real training; the detector judges the norm *before* it (the record shows ~100x).
    trainer = fast_trainer(tmp_path, [detector], max_steps=70, logger=logger, gradient_clip_val=1.0)
    trainer.fit(TinyLM(lr=1e-3, grad_scale_at={50: 100.0}), token_loader())

    records = read_spikes(logger.log_dir)
    assert [r["step"] for r in records] == [50]
    record = records[0]
    assert record["kind"] == "grad_norm" and record["action"] == "log"
    assert record["ratio"] > 30 and record["value"] == pytest.approx(record["grad_norm"])
    assert math.isfinite(record["loss"]) and record["lr"] == pytest.approx(1e-3)
    assert len(record["top_params"]) == 5 and record["top_params"][0][1] >= record["top_params"][-1][1]
    assert all(name.startswith("model.") for name, _ in record["top_params"])
    assert detector.count == 1 and detector.max_ratio == pytest.approx(record["ratio"])
    assert math.isfinite(detector.last_grad_norm) and detector.last_loss == pytest.approx(
        trainer.callback_metrics["train/loss"].item(), rel=1e-5)

    logged = scalars(logger.log_dir)
    assert logged["spike/event_ratio"] == [(50, pytest.approx(record["ratio"], rel=1e-5))]
    assert logged["spike/count"][-1][1] == 1.0
    assert logged["spike/max_ratio"][-1][1] == pytest.approx(record["ratio"], rel=1e-5)
    assert logged["spike/per_1k_steps"][-1][1] == pytest.approx(1000 / 70, rel=1e-5)
    assert {"spike/ratio", "spike/skipped"} <= logged.keys()


@pytest.mark.parametrize("inject, optimizer_kwargs, accumulate", [
    ("grad", {"fused": True}, 1),
    ("grad", {"foreach": False}, 2),
    ("nan", {"foreach": True}, 1),
])
def test_skip_leaves_weights_and_optimizer_state_unchanged(tmp_path, inject, optimizer_kwargs, accumulate):
    step = 24
    injection = {"grad_scale_at": {step: 100.0}} if inject == "grad" else {"nan_loss_at": step}
    module = TinyLM(lr=1e-3, optimizer_kwargs=optimizer_kwargs, **injection)
    module.snapshot_steps = {step, step + 1}
    detector = GradientSpikeDetector(action="skip", warmup=10, log_dir=str(tmp_path))
    trainer = fast_trainer(tmp_path, [detector], max_steps=step + 4, accumulate_grad_batches=accumulate,
                           gradient_clip_val=1.0)  # clipping must cope with the dropped gradients
    trainer.fit(module, token_loader())

    records = read_spikes(tmp_path)
    assert [r["step"] for r in records] == [step]
    assert records[0]["kind"] == ("grad_norm" if inject == "grad" else "non_finite_loss")
    assert_same_state(module.weights_before_step[step], module.weights_before_step[step + 1])
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert trainer.global_step == step + 4  # the skipped step still counts as a step


def test_non_finite_loss_is_a_spike_even_during_warmup(tmp_path):
    detector = GradientSpikeDetector(action="skip", warmup=1000, log_dir=str(tmp_path))
    module = TinyLM(lr=1e-3, nan_loss_at=3)
    fast_trainer(tmp_path, [detector], max_steps=6).fit(module, token_loader())
    assert [(r["step"], r["kind"]) for r in read_spikes(tmp_path)] == [(3, "non_finite_loss")]
    assert detector.nonfinite == 1 and all(torch.isfinite(p).all() for p in module.parameters())


@pytest.mark.parametrize("precision, fused, action", [
    ("bf16-mixed", False, "log"),
    ("16-mixed", False, "log"),
    # A fused optimizer unscales inside step(): the detector unscales first (true norm, GradScaler's inf
    # check recorded), then drops the spike's gradients; GradScaler's update must not fail after that.
    ("16-mixed", True, "skip"),
])
def test_mixed_precision_spike_and_unscaled_loss(tmp_path, precision, fused, action):
    # fp16 AMP on CPU needs an explicit CPU GradScaler; the loss seen in on_before_backward is scaled by it.
    kwargs = ({"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu"))]} if precision == "16-mixed"
              else {"precision": precision})
    detector = GradientSpikeDetector(action=action, warmup=10, log_dir=str(tmp_path))
    trainer = fast_trainer(tmp_path, [detector], max_steps=24, **kwargs)
    trainer.fit(TinyLM(lr=1e-3, grad_scale_at={20: 100.0}, optimizer_kwargs={"fused": fused}), token_loader())
    assert [r["step"] for r in read_spikes(tmp_path)] == [20]
    assert 1.0 < detector.loss_stats.level() < 5.0  # ~ln(32) = 3.47 early on, not 65536x that
    assert 0.01 < detector.grad_stats.level() < 100  # the true norm, not 65536x that
    assert trainer.global_step == 24


def test_stop_saves_a_checkpoint_that_resumes(tmp_path):
    step = 20
    module = TinyLM(lr=1e-3, grad_scale_at={step: 100.0})
    module.snapshot_steps = {step}
    detector = GradientSpikeDetector(action="stop", warmup=10, log_dir=str(tmp_path))
    trainer = fast_trainer(tmp_path, [detector], max_steps=100)
    trainer.fit(module, token_loader())

    assert trainer.global_step == step + 1  # stopped right after the (dropped) spike step
    path = tmp_path / f"spike-stop-step{step:08d}.ckpt"
    assert path.exists()
    checkpoint = load_file(path)
    assert checkpoint["global_step"] == step + 1
    for key, value in module.weights_before_step[step]["weights"].items():
        assert torch.equal(checkpoint["state_dict"][key], value), key  # the spike never reached the weights
    saved = checkpoint["callbacks"]["GradientSpikeDetector"]
    assert saved["count"] == 1 and saved["steps_seen"] == step + 1

    resumed = GradientSpikeDetector(action="stop", warmup=10, log_dir=str(tmp_path))
    trainer = fast_trainer(tmp_path, [resumed], max_steps=step + 10)
    trainer.fit(TinyLM(lr=1e-3), token_loader(), ckpt_path=str(path))
    assert trainer.global_step == step + 10
    assert resumed.count == 1 and resumed.steps_seen == step + 10
    assert resumed.grad_stats.count == detector.grad_stats.count + 9


@pytest.mark.parametrize("method", ["ema", "median"])
def test_no_false_alarms_on_a_normal_run(tmp_path, method):
    detector = GradientSpikeDetector(method=method, log_dir=str(tmp_path))
    fast_trainer(tmp_path, [detector], max_steps=300).fit(TinyLM(lr=1e-3), token_loader())
    assert detector.count == 0 and read_spikes(tmp_path) == []
    assert detector.steps_seen == 300 and 1.0 < detector.max_ratio < 4.0


@pytest.mark.parametrize("method", ["ema", "median"])
def test_state_round_trips_through_a_checkpoint(tmp_path, method):
    detector = GradientSpikeDetector(method=method, warmup=5, log_dir=str(tmp_path))
    trainer = fast_trainer(tmp_path, [detector], max_steps=15)
    trainer.fit(TinyLM(lr=1e-3, grad_scale_at={10: 100.0}), token_loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")

    state = load_file(tmp_path / "last.ckpt")["callbacks"]["GradientSpikeDetector"]
    fresh = GradientSpikeDetector(method=method)
    fresh.load_state_dict(state)
    assert fresh.state_dict() == detector.state_dict()
    assert (fresh.count, fresh.steps_seen, fresh.last_spike_step) == (1, 15, 10)
    assert fresh.grad_stats.level() == detector.grad_stats.level()


def test_statistics_by_hand():
    ema = EmaStats(decay=0.5)
    for x in (1.0, 3.0, 3.0):
        ema.update(x)
    # mean: 1 -> 2 -> 2.5; var: 0 -> 0.5*(0 + 0.5*4) = 1 -> 0.5*(1 + 0.5*1) = 0.75
    assert (ema.level(), ema.spread()) == (2.5, math.sqrt(0.75))
    median = MedianStats(window=3)
    for x in (10.0, 1.0, 2.0, 4.0):
        median.update(x)
    assert median.level() == 2.0 and median.spread() == pytest.approx(1.4826 * 1.0)  # window [1, 2, 4]


def test_event_files_hold_no_stray_spike_records(tmp_path):
    """A plain run through the public logger: the summary tags exist and no event tag is written."""
    logger = TensorBoardLogger(tmp_path, name="", version="")
    fast_trainer(tmp_path, [GradientSpikeDetector(warmup=5)], max_steps=12, logger=logger).fit(
        TinyLM(lr=1e-3), token_loader())
    logged = scalars(logger.log_dir)
    assert "spike/event_ratio" not in logged and logged["spike/count"] == [(s, 0.0) for s in range(12)]
    assert not glob.glob(os.path.join(logger.log_dir, "spikes.jsonl"))


def test_callbacks_build_from_yaml_as_lightning_cli_does():
    """The YAML of docs/monitoring.md, parsed by jsonargparse (LightningCLI's parser) into live callbacks."""
    from jsonargparse import ArgumentParser

    from diffv2_lit.callbacks import DiffMonitor

    parser = ArgumentParser()
    parser.add_argument("--callbacks", type=list[L.Callback])
    yaml = """
callbacks:
  - class_path: diffv2_lit.callbacks.GradientSpikeDetector
    init_args: {action: skip, factor: 4.0, z: null, warmup: 50, method: median}
  - class_path: diffv2_lit.callbacks.DiffMonitor
    init_args: {every_n_steps: 100, probe_batch_size: 2}
"""
    config = parser.parse_string(yaml)
    detector, monitor = parser.instantiate_classes(config).callbacks
    assert isinstance(detector, GradientSpikeDetector) and isinstance(monitor, DiffMonitor)
    assert (detector.action, detector.z, detector.method, monitor.every_n_steps) == ("skip", None, "median", 100)


def test_watch_loss_judges_the_loss_with_its_own_statistics():
    detector = GradientSpikeDetector(warmup=3, watch_loss=True)
    for _ in range(5):
        assert detector._judge(1.0, 2.0, overflow_expected=False) is None
    spike = detector._judge(1.0, 20.0, overflow_expected=False)
    assert spike["kind"] == "loss" and spike["ratio"] == pytest.approx(10.0)
    assert detector.loss_stats.count == 5 and detector.grad_stats.count == 5  # the spiky step entered neither
    assert detector._judge(float("inf"), 2.0, overflow_expected=True) is None and detector.overflows == 1


def _noisy(level: float, n: int, seed: int) -> list[float]:
    generator = torch.Generator().manual_seed(seed)
    return (level * (1 + 0.03 * torch.randn(n, generator=generator))).tolist()


@pytest.mark.parametrize("method", ["ema", "median"])
def test_a_lasting_shift_is_taken_as_the_new_level_not_flagged_forever(method):
    """3% noise, then the level moves 1.5x for good at step 300 (a resume with a smaller batch, a new data
    mixture): the detector flags `max_consecutive` steps, re-baselines, and flags nothing after."""
    detector = GradientSpikeDetector(method=method, max_consecutive=10)
    values = _noisy(1.0, 300, seed=0) + _noisy(1.5, 300, seed=1)
    flagged = [step for step, value in enumerate(values)
               if detector._observe(value, None, step, overflow_expected=False)[0] is not None]
    assert flagged == list(range(300, 310))
    assert detector.rebaselines == 1
    assert detector.grad_stats.level() == pytest.approx(1.5, rel=0.05)


def test_without_a_bound_the_shift_locks_the_detector_out():
    """The failure the bound exists for (max_consecutive=None): every step after the shift is a spike."""
    detector = GradientSpikeDetector(max_consecutive=None)
    values = _noisy(1.0, 300, seed=0) + _noisy(1.5, 300, seed=1)
    spikes = [detector._observe(value, None, step, overflow_expected=False)[0] for step, value in enumerate(values)]
    assert sum(spike is not None for spike in spikes[300:]) == 300


def test_skip_mode_resumes_updating_after_a_lasting_shift(tmp_path):
    """A real run whose gradients grow 3x for good at step 30 (skip mode): 5 steps in a row are skipped,
    then the detector re-baselines with one warning and the weights move again."""
    shift = 30

    class ShiftedLM(TinyLM):
        def on_after_backward(self):
            if self.global_step >= shift:
                for p in self.parameters():
                    p.grad.mul_(3.0)

    module = ShiftedLM(lr=1e-3)
    module.snapshot_steps = {shift, shift + 5, shift + 6, 59}
    detector = GradientSpikeDetector(action="skip", warmup=10, max_consecutive=5, log_dir=str(tmp_path))
    with pytest.warns(UserWarning, match="lasting shift, not a spike"):
        fast_trainer(tmp_path, [detector], max_steps=60).fit(module, token_loader())

    flagged = [r["step"] for r in read_spikes(tmp_path)]
    assert flagged[:5] == list(range(shift, shift + 5))
    assert detector.rebaselines == 1 and len(flagged) < 8  # after that, at most an isolated outlier or two
    assert_same_state(module.weights_before_step[shift], module.weights_before_step[shift + 5])
    moved = module.weights_before_step[59]["weights"]
    assert not all(torch.equal(moved[k], v) for k, v in module.weights_before_step[shift + 5]["weights"].items())


def test_on_persistent_stop_saves_a_checkpoint_that_resumes_at_the_new_level(tmp_path):
    class ShiftedLM(TinyLM):
        def on_after_backward(self):
            if self.global_step >= 20:
                for p in self.parameters():
                    p.grad.mul_(3.0)

    detector = GradientSpikeDetector(action="log", warmup=10, max_consecutive=4, on_persistent="stop",
                                     log_dir=str(tmp_path))
    trainer = fast_trainer(tmp_path, [detector], max_steps=100)
    trainer.fit(ShiftedLM(lr=1e-3), token_loader())
    assert trainer.global_step == 24  # steps 20-23 flagged, stopped after the 4th
    saved = torch.load(tmp_path / "spike-stop-step00000023.ckpt", weights_only=False)
    state = saved["callbacks"]["GradientSpikeDetector"]
    assert state["rebaselines"] == 1 and state["run"] == []
    resumed = GradientSpikeDetector(action="log", warmup=10, max_consecutive=4, on_persistent="stop")
    resumed.load_state_dict(state)
    assert resumed.grad_stats.level() == pytest.approx(detector.grad_stats.level())
    assert state["grad_stats"]["count"] == 4  # restarted from the four shifted values alone
    level_before_shift = read_spikes(tmp_path)[0]["level"]
    assert 2.0 < resumed.grad_stats.level() / level_before_shift < 4.0  # gradients grew 3x


@pytest.mark.parametrize("kwargs, message", [
    ({"max_consecutive": 0}, "max_consecutive=0"),
    ({"on_persistent": "ignore"}, "on_persistent='ignore' is unknown"),
])
def test_persistence_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GradientSpikeDetector(**kwargs)
