"""The GPU suite's dry mode: every section runs at toy size on the CPU and reports real numbers.

What the suite measures is checked elsewhere at more shapes (tests/model: kernels, loss, decoding;
tests/training/test_hardware_matrix.py: every fragment trains the quickstart), so the dry run checks what only
it has: the script's sections, rows, report and JSON, with one training run read back from its events. It
runs `main` in this process (the training row is a real `diffv2-lit fit` process, as on a GPU)."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


@pytest.mark.slow
def test_gpu_suite_runs_dry_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "suite.json"
    code = gpu_suite.main(["--dry", "--out", str(out), "--workdir", str(tmp_path / "work"),
                           "--sections", "kernels,training,decode"])
    printed = capsys.readouterr().out
    assert code == 0, printed[-3000:]
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
        assert math.isfinite(row["peak_gb"]) or math.isnan(row["peak_gb"])
        assert row["host_syncs_per_step"] <= 1  # issue 20's budget, counted in the real run with the recipe's callbacks
    assert {(r["batch"], r["variant"], r["decode"]) for r in rows["decode"]} == {
        (b, v, d) for b in (1, 16) for v in ("baseline", "diffv2") for d in ("eager", "static")}
    assert all(r["status"] == "ok" for r in rows["decode"])  # greedy tokens equal in both modes
    assert "### training" in printed and "| run |" in printed and "### decode" in printed


def test_the_ablation_table_pairs_every_size_for_the_flop_rate_ratio():
    """The ablation section's training rows are the training section's `training_row`; what is its own: the
    FLOP-rate ratio finds both recipe runs of each size by the names `ablation_plan` gives them."""
    names = [run.name for run in gpu_suite.ablation_plan(dry=False)]
    rows = [{"run": name, "mfu": 0.30 if "diffv2" in name else 0.40, "status": "ok"} for name in names]
    ratios = gpu_suite.flop_rate_rows(rows)
    assert [(r["run"], round(r["ratio"], 6)) for r in ratios] == [
        ("125m: DIFF V2 / baseline FLOP rate", 0.75), ("1.3b: DIFF V2 / baseline FLOP rate", 0.75)]
    assert [run.name for run in gpu_suite.ablation_plan(dry=True)] == ["quickstart-diffv2 loss chunked"]
