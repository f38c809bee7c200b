"""The memory estimator's exact terms against the bytes a real 2-process FSDP2 run holds (gloo, CPU).

memory_run.py sums the tensors' own storages per rank: the parameters' local shards, their gradients,
AdamW's state, and everything else alive; the accumulated unsharded gradients are what "everything else"
grows by over the backward of a step's first micro-batch (step 1 without syncing, step 2 syncing every
micro-batch). FSDP2 computes in bf16 and reduces in fp32,
as the GPU recipes do, with odd row counts so that the shards are padded.
"""

import json
import os
from pathlib import Path

import pytest

from diffv2_lit.model import count_parameters, resolve_model_config
from diffv2_lit.training.memory import Layout, estimate_memory
from tests.training.helpers import TINY_MODEL
from tests.training.memory_run import ARCHITECTURE, SEQ_LEN
from tests import zygote

SCRIPT = Path(__file__).with_name("memory_run.py")
ROOT = SCRIPT.parents[2]
CONFIG = resolve_model_config({**TINY_MODEL, "attention": "diffv2", **ARCHITECTURE})
N_PARAMETER_TENSORS = 33
SMALL = 64  # bytes: the loss, the token counts and other 0-d tensors of one micro-batch


def _measure(tmp_path: Path) -> list[dict]:
    out = tmp_path / "memory.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    result = zygote.run(["--devices", "2", "--accumulate", "2", "--out", str(out)], tmp_path, env, timeout=300,
                        script=SCRIPT)  # rank 0 forked after the imports (tests/zygote.py)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [json.loads(Path(f"{out}.rank{rank}").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_estimated_states_and_accumulated_gradients_are_the_bytes_fsdp2_holds(tmp_path):
    ranks = _measure(tmp_path)
    estimate = estimate_memory(CONFIG, Layout(micro_batch=2, seq_len=SEQ_LEN, n_gpus=2, accumulation=2))
    fp32 = 4

    for rank, held in enumerate(r["no_sync"] for r in ranks):
        start, backward = held["step_start"], held["first_backward"]
        # Rank 0 holds ceil(rows / 2) of every parameter; FSDP2 pads every rank's parameters and gradients
        # to that size, AdamW's moments follow the unpadded local shard (rank 1: a row less where rows are odd).
        assert start["parameters"] == estimate.parameters
        assert held["before_optimizer_step"]["gradients"] == estimate.gradients
        steps = fp32 * N_PARAMETER_TENSORS  # AdamW's 0-d step counters
        if rank == 0:
            assert start["optimizer"] == estimate.optimizer + steps
        assert 0.99 * estimate.optimizer <= start["optimizer"] - steps <= estimate.optimizer
        # No-sync accumulation: no sharded gradient after the first micro-batch, but every parameter's whole
        # fp32 gradient on every rank, 4 N bytes (not 4 N / G).
        assert backward["gradients"] == 0
        grown = backward["other"] - start["other"]
        assert abs(grown - estimate.accumulated) <= SMALL
        assert abs(grown - fp32 * count_parameters(CONFIG)["total"]) <= SMALL
        # Nothing else of size is held between micro-batches: parameters, optimizer state, accumulated gradients.
        assert abs(backward["live"] - backward["optimizer"] - estimate.parameters - estimate.accumulated) <= 2048

    synced_estimate = estimate_memory(CONFIG, Layout(micro_batch=2, seq_len=SEQ_LEN, n_gpus=2, accumulation=2,
                                                     sync_every_micro_batch=True))
    assert synced_estimate.accumulated == 0
    for held in (r["sync"] for r in ranks):
        start, backward = held["step_start"], held["first_backward"]
        assert abs(backward["other"] - start["other"]) <= SMALL  # nothing unsharded kept
        assert backward["gradients"] == synced_estimate.gradients  # reduce-scattered after every micro-batch
