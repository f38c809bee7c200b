"""Two fits into one run folder (issue 24.3): each claims its own version folder, and neither deletes the other's
checkpoint in progress."""

import os
import socket
import subprocess
import sys

import torch
import yaml

from diffv2_lit.checkpoint.atomic_io import AtomicCheckpointIO
from tests.faults.forked import start  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import output, run_dir, scalars


def test_two_fits_started_together_get_a_version_folder_each(tmp_path):
    runs = [start(tmp_path, "--trainer.max_steps", "2", "--model.lr", lr, log_name=f"{lr}.log")
            for lr in ("1e-3", "2e-3")]
    assert [run.wait(timeout=300) for run in runs] == [0, 0], [(tmp_path / f"{lr}.log").read_text()[-2000:]
                                                                for lr in ("1e-3", "2e-3")]
    assert sorted(os.listdir(tmp_path / "runs" / "faults")) == ["version_0", "version_1"]
    lrs = sorted(yaml.safe_load((run_dir(tmp_path, v) / "config.yaml").read_text())["model"]["lr"] for v in (0, 1))
    assert lrs == [1e-3, 2e-3]  # one config.yaml each, neither overwritten
    for version in (0, 1):
        assert sorted(scalars(run_dir(tmp_path, version), "train/loss")) == [0, 1]  # one run's curve, not two merged


def test_a_save_removes_only_the_temporary_files_of_dead_processes(tmp_path):
    host = socket.gethostname().replace("-", "_")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, running_pid = int(gone.stdout), os.getppid()
    stale = tmp_path / f".last.ckpt.partial-{host}-{dead_pid}"
    in_progress = tmp_path / f".last.ckpt.partial-{host}-{running_pid}"   # another run, still writing
    other_host = tmp_path / f".last.ckpt.partial-othernode-{dead_pid}"    # a process this host cannot see
    for path in (stale, in_progress, other_host):
        path.write_bytes(b"half a checkpoint")
    AtomicCheckpointIO().save_checkpoint({"global_step": 1, "weights": torch.ones(2)}, tmp_path / "last.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([in_progress.name, other_host.name, "last.ckpt"])
    assert in_progress.read_bytes() == b"half a checkpoint"
