"""Issue 23.1: hybrid sharding (HSDP) on 4 CPU processes as 2 replica groups x 2 shards (gloo).

The losses and the global gradient norms (which clipping and the spike detector use) equal one process at
the same global batch, step for step; a sharded checkpoint written under HSDP resumes under plain 4-way
FSDP2, and one written by 4-way FSDP2 resumes under HSDP, continuing the one-process run."""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest

RUN = Path(__file__).with_name("hsdp_run.py")
ROOT = Path(__file__).parents[2]


def run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    result = subprocess.run([sys.executable, str(RUN), "--ckpt-dir", str(tmp_path / "checkpoints"), "--out", str(out),
                             *args], cwd=tmp_path, capture_output=True, text=True, timeout=400,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_hsdp_two_by_two_equals_one_process_and_resumes_under_fsdp2_and_hsdp(tmp_path):
    (tmp_path / "single").mkdir()
    single = run(tmp_path / "single", "single", "--devices", "1", "--max-steps", "6")
    hsdp = run(tmp_path, "hsdp", "--devices", "4", "--shard-size", "2", "--max-steps", "4")
    assert (hsdp["mesh"], hsdp["mesh_dims"]) == ([2, 2], ["replicate", "shard"])
    assert hsdp["losses"] == pytest.approx(single["losses"][:4], rel=1e-5)
    assert hsdp["grad_norms"] == pytest.approx(single["grad_norms"][:4], rel=1e-5)

    checkpoints = tmp_path / "checkpoints"
    fsdp2 = run(tmp_path, "fsdp2", "--devices", "4", "--max-steps", "6", "--resume-from", str(checkpoints / "step=2.ckpt"))
    assert (fsdp2["mesh"], fsdp2["mesh_dims"]) == ([4], ["data_parallel"])
    assert fsdp2["losses"] == pytest.approx(single["losses"][2:], rel=1e-5)
    assert fsdp2["grad_norms"] == pytest.approx(single["grad_norms"][2:], rel=1e-5)

    # and back: the checkpoint the 4-way FSDP2 run wrote at step 4 (ModelCheckpoint's "-v1": step=4 existed)
    written_by_fsdp2 = checkpoints / "step=4-v1.ckpt"
    assert written_by_fsdp2.is_dir()
    again = run(tmp_path, "hsdp-again", "--devices", "4", "--shard-size", "2", "--max-steps", "6",
                "--resume-from", str(written_by_fsdp2))
    assert again["losses"] == pytest.approx(single["losses"][4:], rel=1e-5)
    assert again["grad_norms"] == pytest.approx(single["grad_norms"][4:], rel=1e-5)


def test_hsdp_accumulates_without_syncing_and_equals_one_process(tmp_path):
    """No-sync accumulation (the default): 4 ranks x 2 micro-batches of 1 = one process's batch of 8."""
    (tmp_path / "single").mkdir()
    single = run(tmp_path / "single", "single", "--devices", "1", "--max-steps", "3", "--global-batch", "8")
    hsdp = run(tmp_path, "hsdp", "--devices", "4", "--shard-size", "2", "--max-steps", "3", "--global-batch", "8",
               "--accumulate", "2")
    per_step = [sum(hsdp["losses"][i:i + 2]) for i in range(0, 6, 2)]  # the recorder sees each micro-batch's share
    assert per_step == pytest.approx(single["losses"], rel=1e-5)
    assert hsdp["grad_norms"] == pytest.approx(single["grad_norms"], rel=1e-5)


def _states_gib(capsys, *configs: str) -> float:
    from diffv2_lit.cli import plan

    args = [a for c in configs for a in ("--config", str(ROOT / c))]
    assert plan.main([*args, "--trainer.accumulate_grad_batches", "4"]) == 0
    out = capsys.readouterr().out
    return float(re.search(r"^  states +([\d.]+) GiB", out, re.M).group(1))


def test_plan_shards_the_states_over_a_node_under_the_multinode_hsdp_fragment(capsys):
    """examples/slurm_multinode.sbatch's default: 16 GPUs hold the states as one node of 8 does, not 1/16."""
    recipe = "recipes/6.7b-diffv2.yaml"
    node = _states_gib(capsys, recipe, "configs/hardware/8gpu-fsdp2.yaml")
    hybrid = _states_gib(capsys, recipe, "configs/hardware/multinode-hsdp.yaml")
    full = _states_gib(capsys, recipe, "configs/hardware/multinode.yaml")
    assert hybrid == node and full == pytest.approx(node / 2, abs=0.1)
    assert "multinode-hsdp.yaml" in (ROOT / "examples" / "slurm_multinode.sbatch").read_text()
