"""Under DDP every rank holds the whole model, so the monitor's diagnostic forward and the text sample run on
rank 0 alone (under FSDP every rank must join each forward: tests/callbacks/test_fsdp.py runs the monitor
sharded on two ranks)."""

import json
import os
import subprocess
import sys


def test_ddp_runs_the_monitor_and_the_sample_on_rank_zero_only(tmp_path):
    script = os.path.join(os.path.dirname(__file__), "rank_zero_run.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, script, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    # Steps 0, 2, 4: three diagnostic forwards; steps 2, 4, 6: three samples of 4 tokens (a prefill and 3 steps).
    assert ranks[0] == {"diagnostic_forwards": 3, "generation_forwards": 12}
    assert ranks[1] == {"diagnostic_forwards": 0, "generation_forwards": 0}
