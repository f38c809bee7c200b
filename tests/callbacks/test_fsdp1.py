"""FSDP1 (`strategy: fsdp`) is contained in the callbacks' protocol: `with_model` runs SampleText's generation
and DiffMonitor's diagnostic forward inside the FSDP1 wrapper's forward, and both give on every rank of a real
2-process sharding what the unwrapped weights give; the model itself has one forward."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("fsdp1_run.py")


@pytest.mark.slow
def test_callbacks_run_the_sharded_model_through_the_fsdp1_wrapper(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(SCRIPT.parents[2]), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(SCRIPT), str(tmp_path)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for found in ranks:
        assert found["local_elements"] < found["full_elements"]  # each rank holds a shard only
        assert found["direct_call"] != "ran"  # calling the model past the wrapper cannot work
        assert found["sample"] == found["reference_sample"] and len(found["sample"]) > 2
        assert found["scalars"].keys() == found["reference_scalars"].keys()
        assert found["scalars"] == pytest.approx(found["reference_scalars"], rel=1e-5, abs=1e-6)
