"""The training step's hot path (issue 20): on an optimizer step, one host sync and one collective beyond the
gradient reduction itself, with the recipes' default callbacks, whether or not the step logs.

Counted by tests/training/host_sync_run.py in a real run (see its docstring for what counts). Steps where
DiffMonitor measures (0, 6) or SampleText decodes (5, 11: the sample follows step 6 and 12) do their own
work on their own schedule and are left out, as are steps the spike detector flags (its record reads the
per-parameter norms); on rank 0 they also show that the counter sees syncs at all.
"""

import json
import os
from pathlib import Path

import pytest
from tests import zygote

SCRIPT = Path(__file__).with_name("host_sync_run.py")
ROOT = SCRIPT.parents[2]
OWN_SCHEDULE = {0, 5, 6, 11}
LOGGING_STEPS = {3, 7}  # log_every_n_steps=4: Lightning writes at steps 3, 7, 11


def _counts(tmp_path: Path, devices: int, action: str) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    result = zygote.run(["--out", str(tmp_path / "counts.json"), "--devices", str(devices), "--action", action,
                         "--accumulate", "2"], tmp_path, env, timeout=300, script=SCRIPT)  # forked: tests/zygote.py
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads((tmp_path / f"counts.json.rank{rank}").read_text()) for rank in range(devices)]


@pytest.mark.parametrize("devices, action", [
    pytest.param(1, "log", id="1-process-log"),
    pytest.param(1, "skip", id="1-process-skip"),
    pytest.param(2, "log", id="2-processes-log", marks=pytest.mark.slow),
    pytest.param(2, "skip", id="2-processes-skip", marks=pytest.mark.slow),
])
def test_one_host_sync_and_one_collective_per_optimizer_step(tmp_path, devices, action):
    for rank, run in enumerate(_counts(tmp_path, devices, action)):
        per_step = {int(step): counts for step, counts in run["per_step"].items()}
        assert sorted(per_step) == list(range(12))
        judged = set(per_step) - OWN_SCHEDULE - set(run["spike_steps"])
        assert LOGGING_STEPS <= judged
        for step in sorted(judged):
            counts = per_step[step]
            assert counts.get("syncs", 0) == 1, (rank, step, counts)
            assert counts.get("collectives", 0) == (1 if devices > 1 else 0), (rank, step, counts)
        if rank == 0:  # DiffMonitor's probe (under DDP rank 0's alone): the counter counts
            assert per_step[0]["syncs"] > 1 and per_step[6]["syncs"] > 1
        else:  # the other DDP ranks skip the probe's forward (tests/callbacks/test_rank_zero.py)
            assert per_step[0]["syncs"] == 1 and per_step[6]["syncs"] == 1
