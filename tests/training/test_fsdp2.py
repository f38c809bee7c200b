"""Real sharding on CPU: 2 processes (gloo), ModelParallelStrategy + FSDP2, sharded checkpoint, resume."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from diffv2_lit.checkpoint.consolidate import consolidate
from diffv2_lit.checkpoint.layout import is_sharded
from diffv2_lit.checkpoint.safe_load import load_file
from tests import zygote

SCRIPT = Path(__file__).with_name("run_tiny.py")
ROOT = SCRIPT.parents[2]


def _run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    # Rank 0 forked from the zygote after the imports (tests/zygote.py); Lightning starts rank 1 as a process.
    result = zygote.run(["--out", str(out), *args], tmp_path, env, timeout=300, script=SCRIPT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> dict:
    """The reference: one process, no sharding, 6 steps (the schedule is 6 steps long in every run)."""
    return _run(tmp_path_factory.mktemp("single"), "single", "--max-steps", "6")


@pytest.fixture(scope="module")
def written_on_two(tmp_path_factory) -> dict:
    """Steps 1-4 on 2 processes under FSDP2 and their sharded checkpoints (tests resume from copies)."""
    tmp = tmp_path_factory.mktemp("written_on_two")
    first = _run(tmp, "first", "--devices", "2", "--strategy", "fsdp2", "--ckpt-dir", str(tmp / "ckpts"),
                 "--max-steps", "4")
    return {"losses": first["losses"], "ckpts": tmp / "ckpts"}


def _copy_checkpoints(written: dict, tmp_path: Path) -> Path:
    return Path(shutil.copytree(written["ckpts"], tmp_path / "ckpts"))


@pytest.mark.slow
def test_fsdp2_two_processes_match_single_process_and_resume(tmp_path, single, written_on_two):
    ckpt_dir = _copy_checkpoints(written_on_two, tmp_path)
    sharded = ["--devices", "2", "--strategy", "fsdp2", "--ckpt-dir", str(ckpt_dir)]
    first = written_on_two

    last = ckpt_dir / "last.ckpt"
    assert is_sharded(last), "FSDP2 must write a sharded (distributed) checkpoint folder"
    assert len(list(last.glob("__*_0.distcp"))) == 2  # one shard file per rank

    resumed = _run(tmp_path, "resumed", *sharded, "--max-steps", "6", "--resume")
    torch.testing.assert_close(first["losses"], single["losses"][:4], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(resumed["losses"], single["losses"][4:], rtol=1e-4, atol=1e-5)
    assert resumed["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-3)

    merged = consolidate(ckpt_dir / "last.ckpt", tmp_path / "merged.ckpt")
    checkpoint = load_file(merged)
    assert checkpoint["hyper_parameters"]["model_config"]["attention"] == "diffv2"
    weight = checkpoint["state_dict"]["model.layers.0.self_attn.q_proj.weight"]
    assert weight.shape == (2 * 2 * 32, 64)  # full (unsharded) DIFF V2 q_proj: 2h heads of d=32
    assert "optimizer_states" not in checkpoint  # kept only with --with-optimizer


@pytest.mark.slow
def test_fsdp2_accumulation_reduce_scatters_once_per_optimizer_step(tmp_path):
    """Gradient accumulation under FSDP2: the micro-batches before the last keep their gradients unsharded
    on each rank (no reduce-scatter, so no sharded `.grad` yet); the last one reduce-scatters. The losses
    equal a single process accumulating the same micro-batches."""
    accumulate = ["--max-steps", "3", "--accumulate", "2"]
    single = _run(tmp_path, "single", *accumulate)
    once = _run(tmp_path, "once", "--devices", "2", "--strategy", "fsdp2", *accumulate)
    every = _run(tmp_path, "every", "--strategy", "fsdp2", *accumulate, "--sync-every-micro-batch")  # one rank

    assert once["grads_after_backward"] == [False, True] * 3
    assert every["grads_after_backward"] == [True, True] * 3  # FSDP2's own default
    torch.testing.assert_close(once["losses"], single["losses"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(every["losses"], single["losses"], rtol=1e-4, atol=1e-5)
    assert once["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-3)


@pytest.mark.slow
def test_fsdp2_cpu_offload_initialises_like_a_single_process(tmp_path, single):
    """With CPU offload every rank must hold its own part of one initialisation. DTensor's random ops on
    the CPU draw every rank's shard from the same seed; had the shards been initialised that way, the
    sharded model would differ from the single-process one and so would its first losses."""
    offloaded = _run(tmp_path, "offloaded", "--devices", "2", "--strategy", "fsdp2", "--max-steps", "3",
                     "--cpu-offload")
    torch.testing.assert_close(offloaded["losses"], single["losses"][:3], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp2_with_compile_and_activation_checkpointing_keeps_the_losses(tmp_path, single):
    """What the GPU recipes run: activation checkpointing, then per-block compile, then FSDP2, in that order
    (here every 2nd block checkpointed, one rank): the losses of the plain single-process run."""
    recipe_like = _run(tmp_path, "recipe-like", "--strategy", "fsdp2", "--max-steps", "3", "--compile",
                       "--activation-checkpointing", "2")
    torch.testing.assert_close(recipe_like["losses"], single["losses"][:3], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("written_on, resumed_on", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_sharded_checkpoint_resumes_exactly_on_another_process_count(tmp_path, single, written_on_two, written_on,
                                                                     resumed_on):
    """A guarantee (docs/faults.md): the same global batch on another number of processes continues the run
    exactly, in losses and gradient norm (the micro-batch per rank is GLOBAL_BATCH / processes)."""
    if written_on == 2:  # the 2-process run of test_fsdp2_two_processes_match_single_process_and_resume
        ckpt_dir = _copy_checkpoints(written_on_two, tmp_path)
    else:
        ckpt_dir = tmp_path / "ckpts"
        _run(tmp_path, "first", "--devices", str(written_on), "--strategy", "fsdp2", "--ckpt-dir", str(ckpt_dir),
             "--max-steps", "4")
    assert len(list((ckpt_dir / "last.ckpt").glob("__*_0.distcp"))) == written_on
    resumed = _run(tmp_path, "resumed", "--devices", str(resumed_on), "--strategy", "fsdp2", "--ckpt-dir",
                   str(ckpt_dir), "--max-steps", "6", "--resume")
    torch.testing.assert_close(resumed["losses"], single["losses"][4:], rtol=1e-4, atol=1e-5)
    assert resumed["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-3)
