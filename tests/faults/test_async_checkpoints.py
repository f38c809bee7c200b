"""Issue 23.2: sharded (FSDP2) checkpoints are written in the background, and keep every promise of the
fault suite. Real 2-process runs (gloo) of the fault suite's model; a test callback
(`tests.faults.inject.SlowShardedWrites`) slows the background write down so that what happens meanwhile
can be seen: training goes on, a kill leaves the previous checkpoint as the one that resumes (bit-identical
to the uninterrupted run), and a preemption waits for the write before it exits."""

import json
import os
import signal
import subprocess

import pytest

from diffv2_lit.checkpoint.layout import COMPLETE_MARKER
from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import MAX_STEPS, env, fit_args, output, run_dir, scalars, wait_for

FSDP2 = ("trainer:\n  devices: 2\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
         "    init_args: {data_parallel_size: 2, tensor_parallel_size: 1}\n"
         "model:\n  parallel:\n    fsdp_param_dtype: null\n    fsdp_reduce_dtype: null\n")


def _slow(tmp_path, seconds: float, at_step: int | None = None) -> list[str]:
    (tmp_path / "fsdp2.yaml").write_text(FSDP2)
    args = ["--config", str(tmp_path / "fsdp2.yaml"), "--trainer.callbacks+=tests.faults.inject.SlowShardedWrites",
            f"--trainer.callbacks.seconds={seconds}", f"--trainer.callbacks.marker={tmp_path / 'in_write'}",
            f"--trainer.callbacks.record={tmp_path / 'writes.jsonl'}"]
    return args + ([f"--trainer.callbacks.at_step={at_step}"] if at_step is not None else [])


def _writes(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "writes.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """A 2-process FSDP2 run whose step-3 save takes 2 s in the background."""
    tmp = tmp_path_factory.mktemp("async")
    result = fit(tmp, *_slow(tmp, 2.0, at_step=3))
    assert result.returncode == 0, output(result)[-3000:]
    return {"dir": tmp, "losses": scalars(run_dir(tmp, 0), "train/loss")}


def test_training_goes_on_while_a_sharded_save_is_written(uninterrupted):
    tmp = uninterrupted["dir"]
    slow = [w for w in _writes(tmp) if w["save_step"] == 3]
    assert slow and all(w["training_step"] > 3 for w in slow), slow  # steps were taken during the 2 s write
    assert sorted(uninterrupted["losses"]) == list(range(MAX_STEPS))
    for folder in (run_dir(tmp, 0) / "checkpoints").glob("*.ckpt"):  # every save finished and was marked
        assert (folder / COMPLETE_MARKER).is_file(), folder


def test_a_kill_during_a_background_write_resumes_from_the_previous_checkpoint_bit_identically(tmp_path,
                                                                                               uninterrupted):
    log = open(tmp_path / "killed.log", "w")
    process = subprocess.Popen(fit_args(*_slow(tmp_path, 60.0, at_step=6)), cwd=tmp_path, env=env(tmp_path),
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_for((tmp_path / "in_write").exists, process)
    os.killpg(process.pid, signal.SIGKILL)  # both ranks, in the middle of the step-6 write
    process.wait(timeout=60)
    checkpoints = run_dir(tmp_path, 0) / "checkpoints"
    assert not (checkpoints / "epoch=0-step=6.ckpt" / COMPLETE_MARKER).exists()
    assert (checkpoints / "epoch=0-step=3.ckpt" / COMPLETE_MARKER).is_file()

    (tmp_path / "writes.jsonl").unlink(missing_ok=True)
    resumed_run = fit(tmp_path, "--config", str(tmp_path / "fsdp2.yaml"), "--ckpt_path", "last")
    assert resumed_run.returncode == 0, output(resumed_run)[-3000:]
    resumed = scalars(run_dir(tmp_path, 1), "train/loss")
    assert min(resumed) == 3 and sorted(resumed) == list(range(3, MAX_STEPS))
    assert resumed == {step: uninterrupted["losses"][step] for step in resumed}  # bit-identical


def test_a_preemption_waits_for_the_background_write_before_it_exits(tmp_path):
    log = open(tmp_path / "preempted.log", "w")
    process = subprocess.Popen(fit_args(*_slow(tmp_path, 1.0), "--trainer.callbacks+=tests.faults.inject.StepMarker",
                                        f"--trainer.callbacks.path={tmp_path / 'step.txt'}"),
                               cwd=tmp_path, env=env(tmp_path), stdout=log, stderr=subprocess.STDOUT)
    wait_for(lambda: (tmp_path / "step.txt").exists() and int((tmp_path / "step.txt").read_text() or 0) >= 4, process)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=240) == 0, (tmp_path / "preempted.log").read_text()[-3000:]
    preempted = run_dir(tmp_path, 0) / "checkpoints" / "last-preempted.ckpt"
    assert (preempted / COMPLETE_MARKER).is_file()  # written and marked before the process ended
