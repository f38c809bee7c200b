"""The GPU suite's dry mode: every section runs at toy size on the CPU and reports real numbers."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_gpu_suite_runs_dry_on_the_cpu(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--dry", "--out", str(out),
                             "--workdir", str(tmp_path / "work"), "--sections", "kernels,training,decode,ablation"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {r["variant"] for r in rows["kernels"]} == {"baseline", "diffv2", "diffv1"}
    logits = [r for r in rows["kernels"] if "vs_eager" in r]
    assert {r["variant"] for r in logits} == {"baseline", "diffv2", "diffv1"}
    assert all(r["status"] == "ok" and r["vs_eager"] < 1e-3 for r in logits)
    steps = [r for r in rows["kernels"] if "step_vs_torch" in r]  # loss + gradients of one step (liger: CUDA only)
    assert sorted((r["variant"], r["path"]) for r in steps) == [
        (v, "chunked loss") for v in ("baseline", "diffv1", "diffv2")]
    assert all(r["status"] == "ok" and r["step_vs_torch"] < 1e-3 for r in steps)
    assert len(rows["training"]) == 1
    for row in rows["training"]:
        assert row["status"] == "ok" and row["tokens_per_s"] > 0 and math.isfinite(row["last_loss"])
    assert {(r["batch"], r["variant"], r["decode"]) for r in rows["decode"]} == {
        (b, v, d) for b in (1, 16) for v in ("baseline", "diffv2") for d in ("eager", "static")}
    assert all(r["status"] == "ok" for r in rows["decode"])  # greedy tokens equal in both modes
    assert [r["run"] for r in rows["ablation"]] == ["quickstart-diffv2 loss chunked"]
    assert all(r["status"] == "ok" and math.isfinite(r["last_loss"]) for r in rows["ablation"])
    assert "### training" in result.stdout and "| run |" in result.stdout
