"""FSDP1 (configs/hardware/8gpu-fsdp1.yaml) clips by norm: our global norm of the flat shards and its
clipping agree with FSDP1's own `clip_grad_norm_`, in 2 real processes (gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fsdp1_clip_run.py")


@pytest.mark.slow
def test_sharded_norm_and_clipping_match_fsdp1s_own(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(SCRIPT), str(out)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(out.read_text())
    assert found["local_grad_elements"] < found["full_model_elements"]  # rank 0 really holds a shard only
    assert found["our_norm"] == pytest.approx(found["reference_norm"], rel=1e-5)
    assert found["our_norm"] > 0.05  # so the clipping below did something
    assert found["clipped_grads_equal_on_every_rank"]
