"""SIGKILL (at a random step, and inside a checkpoint write), SIGTERM and SIGUSR1 against real runs;
every resumed run must log exactly the losses the uninterrupted baseline logged for the same steps."""

import os
import random
import signal
import time

from diffv2_lit.checkpoint.safe_load import load_file
from tests.faults.forked import fit, start  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import MAX_STEPS, kill, output, run_dir, scalars, step_reached, wait_for


def _resume_and_compare(tmp_path, baseline, min_step: int) -> int:
    """Resume with --ckpt_path last; returns the step the resumed run started from."""
    result = fit(tmp_path, "--ckpt_path", "last")
    assert result.returncode == 0, output(result)[-3000:]
    resumed = scalars(run_dir(tmp_path, 1), "train/loss")
    first = min(resumed)
    assert min_step <= first and sorted(resumed) == list(range(first, MAX_STEPS))
    assert resumed == {step: baseline["losses"][step] for step in resumed}  # bit-identical
    return first


def _signal_after(tmp_path, step: int, sig: signal.Signals) -> int:
    """Starts the run, sends `sig` once it has done `step` optimizer steps; returns the exit code."""
    marker = tmp_path / "step.txt"
    process = start(tmp_path, "--trainer.callbacks+=tests.faults.inject.StepMarker",
                    f"--trainer.callbacks.path={marker}")
    wait_for(step_reached(marker, step), process)
    return kill(process, sig)


def _preempted_step(tmp_path) -> int:
    return load_file(run_dir(tmp_path, 0) / "checkpoints" / "last-preempted.ckpt")["global_step"]


def test_sigkill_at_a_random_step_then_resume(tmp_path, baseline):
    kill_after = random.Random(8).randint(4, 10)
    assert _signal_after(tmp_path, kill_after, signal.SIGKILL) == -signal.SIGKILL
    # At most the steps since the last checkpoint (every 3) are lost.
    _resume_and_compare(tmp_path, baseline, min_step=3 * (kill_after // 3) - 3)


def test_sigkill_inside_a_checkpoint_write(tmp_path, baseline):
    """Killed while last.ckpt's temporary file is written (step 6): the old last.ckpt (step 3) stays
    intact, the temporary file never counts as a checkpoint, and the resume starts from step=6."""
    marker = tmp_path / "in_write.txt"
    plugin = tmp_path / "slow_io.yaml"
    plugin.write_text("trainer:\n  plugins:\n    - class_path: tests.faults.inject.SlowAtomicCheckpointIO\n"
                      f"      init_args: {{marker: '{marker}', after: 3}}\n")
    process = start(tmp_path, "--config", str(plugin))
    wait_for(marker.exists, process)
    assert kill(process) == -signal.SIGKILL
    checkpoints = run_dir(tmp_path, 0) / "checkpoints"
    partial = [p.name for p in checkpoints.iterdir() if ".partial-" in p.name]
    assert len(partial) == 1 and partial[0].startswith(".last.ckpt.partial-") and not partial[0].endswith(".ckpt")
    assert load_file(checkpoints / "last.ckpt")["global_step"] == 3
    assert _resume_and_compare(tmp_path, baseline, min_step=6) == 6


def test_sigterm_checkpoints_at_the_next_step_and_exits_cleanly(tmp_path, baseline):
    assert _signal_after(tmp_path, 4, signal.SIGTERM) == 0
    log = (tmp_path / "killed.log").read_text()
    assert "preempted (SIGTERM) after step" in log and "resume with --ckpt_path last" in log
    stopped_at = _preempted_step(tmp_path)
    assert 4 < stopped_at < MAX_STEPS
    assert max(scalars(run_dir(tmp_path, 0), "train/loss")) == stopped_at - 1  # no step after the save
    # Nothing lost: the resume starts exactly where the preempted run stopped.
    assert _resume_and_compare(tmp_path, baseline, min_step=stopped_at) == stopped_at


def test_sigusr1_checkpoints_and_exits_cleanly(tmp_path):
    assert _signal_after(tmp_path, 2, signal.SIGUSR1) == 0
    assert "preempted (SIGUSR1) after step" in (tmp_path / "killed.log").read_text()
    assert 2 < _preempted_step(tmp_path) < MAX_STEPS


def test_ctrl_c_checkpoints_like_sigterm_and_resume_continues(tmp_path, baseline):
    """SIGINT (Ctrl-C) used to end in Lightning's "graceful shutdown": exit 1, no checkpoint, steps lost. Now it
    saves and exits 130, the shell's code for a program stopped by Ctrl-C (issue 25.5)."""
    assert _signal_after(tmp_path, 3, signal.SIGINT) == 130
    log = (tmp_path / "killed.log").read_text()
    assert "Ctrl-C: saving a checkpoint at the end of this step" in log
    assert "interrupted (Ctrl-C) after step" in log and "resume with --ckpt_path last" in log
    assert "weights_only" not in log  # Lightning's warning for a save that does not say what it keeps
    stopped_at = _preempted_step(tmp_path)
    assert 3 < stopped_at < MAX_STEPS
    assert _resume_and_compare(tmp_path, baseline, min_step=stopped_at) == stopped_at


def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    marker = tmp_path / "step.txt"
    process = start(tmp_path, "--trainer.callbacks+=tests.faults.inject.StepMarker",
                    f"--trainer.callbacks.path={marker}", "--trainer.callbacks+=tests.faults.inject.SlowSteps")
    wait_for(step_reached(marker, 2), process)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert kill(process, signal.SIGINT) != 0
    assert not (run_dir(tmp_path, 0) / "checkpoints" / "last-preempted.ckpt").exists()


def slurm_env(tmp_path, rank: int = 0, ntasks: int = 1, port: int = 29517) -> dict:
    """SLURM's variables for task `rank` of a one-node job, set by hand, and a stub `scontrol` on PATH that
    records each call in requeue.log instead of requeueing."""
    stub = tmp_path / "bin" / "scontrol"
    stub.parent.mkdir(exist_ok=True)
    stub.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'requeue.log'}\n")
    stub.chmod(0o755)
    return {"PATH": f"{stub.parent}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "diffv2",
            "SLURM_NTASKS": str(ntasks), "SLURM_NTASKS_PER_NODE": str(ntasks), "SLURM_PROCID": str(rank),
            "SLURM_LOCALID": str(rank), "SLURM_NODEID": "0", "SLURM_NODELIST": "localhost", "SLURM_JOB_NUM_NODES": "1",
            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}


def test_sigusr1_before_training_starts_saves_at_step_one_and_requeues_under_slurm(tmp_path, baseline):
    """SLURM's warning can come while the model is still being built. Lightning's own SLURM handler would save
    hpc_ckpt_1.ckpt from inside the signal handler (where --ckpt_path last never looks) or, before it is
    registered, the signal would kill the process. Here the run saves at the end of its first step, requeues
    once and exits 0; the requeued job resumes bit-identically (issue 19.13)."""
    result = fit(tmp_path, "--trainer.callbacks+=tests.faults.inject.SignalAtFitStart", extra_env=slurm_env(tmp_path))
    assert result.returncode == 0, output(result)[-3000:]
    assert "preempted (SIGUSR1) after step 1" in output(result)
    assert _preempted_step(tmp_path) == 1
    assert (tmp_path / "requeue.log").read_text().split("\n") == ["requeue 4242", ""]
    assert not list(tmp_path.rglob("hpc_ckpt_*.ckpt"))
    assert _resume_and_compare(tmp_path, baseline, min_step=1) == 1
