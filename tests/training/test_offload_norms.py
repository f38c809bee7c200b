"""CPU-offloaded gradient shards never reach a collective (issue 19.3): on GPUs NCCL refuses host tensors, so
the step's norm and the spike record's per-parameter norms must reduce scalars made on the compute device."""

import json
import os
from pathlib import Path

import pytest
from tests import zygote

SCRIPT = Path(__file__).with_name("offload_norm_run.py")
ROOT = SCRIPT.parents[2]


@pytest.mark.slow
def test_norms_of_offloaded_shards_reduce_one_vector_on_the_compute_device(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    result = zygote.run(["--out", str(tmp_path / "record.json")], tmp_path, env, timeout=300,
                        script=SCRIPT)  # rank 0 forked after the imports (tests/zygote.py)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    record = json.loads((tmp_path / "record.json").read_text())
    assert record["spikes"] == 1  # the injected spike was recorded, so the per-parameter path ran too
    assert record["dtensor_gathers"] == 0  # no DTensor full_tensor()/redistribute() of offloaded gradients
    reductions = [c for c in record["collectives"] if c["name"] == "all_reduce"]
    assert len(reductions) == 8 + 1  # one per optimizer step (the step's numbers) and one for the spike record
    assert all(c["device"] == record["root_device"] for c in record["collectives"])
