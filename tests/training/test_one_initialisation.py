"""One initialisation for all ranks, whatever each rank's RNG state (issue 19.14): preparing a data cache on
one rank used to consume its RNG, and on CPU meshes (initialised before sharding) the ranks then held shards of
two different models. A 2-rank FSDP2 run whose ranks start from different RNG states must hold the weights a
single process with rank 0's state initialises."""

import os
from pathlib import Path

import pytest
import torch
from tests import zygote

SCRIPT = Path(__file__).with_name("start_weights_run.py")
ROOT = SCRIPT.parents[2]


def _weights(tmp_path: Path, name: str, *args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    out = tmp_path / name
    result = zygote.run(["--out", str(out), "--perturb-rng", *args], tmp_path, env, timeout=300,
                        script=SCRIPT)  # rank 0 forked after the imports (tests/zygote.py)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(f"{out}.rank0")["weights"]


@pytest.mark.slow
def test_ranks_with_different_rng_states_hold_one_initialisation(tmp_path):
    single = _weights(tmp_path, "single", "--strategy", "auto", "--devices", "1")
    sharded = _weights(tmp_path, "sharded", "--strategy", "fsdp2", "--devices", "2")
    assert sharded.keys() == single.keys()
    for name, value in sharded.items():
        assert torch.equal(value, single[name]), name
