"""FSDP2 (ModelParallelStrategy, 2 CPU processes over gloo): the detector's norm is the global one, both
ranks take the same decisions, and the monitor's collective forward runs on both ranks."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_fsdp2_two_ranks_agree_on_the_global_norm(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "fsdp_run.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["stats"] == ranks[1]["stats"]  # identical statistics: identical decisions
    assert [r["last_spike_step"] for r in ranks] == [12, 12] and [r["count"] for r in ranks] == [1, 1]
    # The median method keeps every accepted value: each equals the norm of the full, unsharded gradients.
    reference = dict(ranks[0]["reference_norms"])
    assert 12 not in reference  # skipped: no gradients left after the detector
    assert ranks[0]["stats"]["values"] == pytest.approx([reference[s] for s in range(15) if s != 12], rel=1e-5)
    records = [json.loads(line) for line in (tmp_path / "spikes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [12]  # written once, by rank 0
    assert [r["monitor_last_step"] for r in ranks] == [10, 10]
    assert ranks[0]["first_weight_sum"] == ranks[1]["first_weight_sum"]
