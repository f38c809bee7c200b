"""The SLURM path on CPU processes: two tasks of one job started by hand with SLURM's variables (as srun
would), a stub `scontrol`, gloo DDP. SIGUSR1 that reaches rank 1 only still saves on every rank, requeues
the job once (from rank 0), exits 0, and the requeued job resumes bit-identically (issue 19.13)."""

import socket
import subprocess

import pytest

from diffv2_lit.checkpoint.safe_load import load_file
from tests.faults.forked import start  # both tasks forked after the imports (tests/zygote.py)
from tests.faults.helpers import MAX_STEPS, output, run_dir, scalars
from tests.faults.test_kill_resume import slurm_env

TWO_TASKS = ("--trainer.devices", "2", "--trainer.strategy", "ddp")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _job(tmp_path, *extra: str, name: str) -> list[int]:
    """Both tasks of the job; returns their exit codes."""
    port = _free_port()
    tasks = [start(tmp_path, *TWO_TASKS, *extra, extra_env=slurm_env(tmp_path, rank, ntasks=2, port=port),
                   log_name=f"{name}-rank{rank}.log") for rank in range(2)]
    codes = []
    for task in tasks:
        try:
            codes.append(task.wait(timeout=300))
        except subprocess.TimeoutExpired:
            for other in tasks:
                other.kill()
            raise
    return codes


@pytest.mark.slow
def test_sigusr1_on_rank_one_only_saves_everywhere_requeues_once_and_resumes_exactly(tmp_path):
    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    assert _job(uninterrupted, name="full") == [0, 0], (uninterrupted / "full-rank0.log").read_text()[-3000:]
    expected = scalars(run_dir(uninterrupted, 0), "train/loss")
    assert sorted(expected) == list(range(MAX_STEPS))

    signal_rank_one = ("--trainer.callbacks+=tests.faults.inject.SignalAtStep", "--trainer.callbacks.step=3",
                       "--trainer.callbacks.rank=1")
    assert _job(tmp_path, *signal_rank_one, name="preempted") == [0, 0], (tmp_path / "preempted-rank0.log").read_text()[-3000:]
    saved = run_dir(tmp_path, 0) / "checkpoints" / "last-preempted.ckpt"
    stopped_at = load_file(saved)["global_step"]
    assert 3 <= stopped_at <= 4  # the signal's own step, or the next one
    assert (tmp_path / "requeue.log").read_text().split("\n") == ["requeue 4242", ""]  # once, by rank 0
    assert "preempted" in (tmp_path / "preempted-rank0.log").read_text()

    assert _job(tmp_path, "--ckpt_path", "last", name="requeued") == [0, 0], (tmp_path / "requeued-rank0.log").read_text()[-3000:]
    resumed = scalars(run_dir(tmp_path, 1), "train/loss")
    assert sorted(resumed) == list(range(stopped_at, MAX_STEPS))
    assert resumed == {step: expected[step] for step in resumed}  # bit-identical
