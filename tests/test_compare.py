"""`diffv2-lit compare` on real TensorBoard event files."""

import subprocess
import sys

import pytest
from torch.utils.tensorboard import SummaryWriter

from diffv2_lit.compare import main


def _write_run(folder, losses, spikes_at=()):
    writer = SummaryWriter(str(folder))
    count = 0
    for step, loss in enumerate(losses):
        count += step in spikes_at
        writer.add_scalar("train/loss", loss, step)
        writer.add_scalar("train/grad_norm", 10.0 if step in spikes_at else 1.0, step)
        writer.add_scalar("spike/count", count, step)
        writer.add_scalar("perf/tokens_seen", 1000 * step, step)
    writer.add_scalar("val/loss", losses[-1] + 0.1, len(losses) - 1)
    writer.add_scalar("spike/per_1k_steps", 1000 * count / len(losses), len(losses) - 1)
    writer.close()


def test_report_groups_seeds_and_tabulates_final_values(tmp_path):
    _write_run(tmp_path / "runs" / "tiny-diffv2-seed0" / "version_0", [3.0, 2.0, 1.0])
    _write_run(tmp_path / "runs" / "tiny-diffv2-seed1" / "version_0", [3.0, 2.0, 1.2])
    _write_run(tmp_path / "runs" / "tiny-baseline-seed0" / "version_0", [3.0, 2.5, 1.5], spikes_at={1})
    assert main([str(tmp_path / "runs"), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    assert "| tiny-diffv2 | 2 | 1.2 ± 0.14 |" in page  # mean and std of 1.1 and 1.3
    assert "| tiny-baseline | 1 | 1.6 | 333.3 |" in page
    for chart in ("train_loss.png", "validation_loss.png", "gradient_norm_before_clipping.png"):
        assert (tmp_path / "report" / chart).stat().st_size > 1000
        assert f"({chart})" in page
    assert "sigmoid" not in page  # no chart for tags no run logged


def test_recipe_twins_sharing_a_logger_name_are_labelled_by_variant(tmp_path):
    for version, attention in enumerate(["diffv2", "baseline"]):
        folder = tmp_path / "runs" / "quickstart" / f"version_{version}"
        _write_run(folder, [3.0, 2.0 + version])
        (folder / "hparams.yaml").write_text(f"model_config:\n  attention: {attention}\n")
    assert main([str(tmp_path / "runs"), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    assert "| quickstart-diffv2 | 1 | 2.1 |" in page and "| quickstart-baseline | 1 | 3.1 |" in page


def test_folder_without_event_files_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    result = subprocess.run([sys.executable, "-m", "diffv2_lit", "compare", str(tmp_path / "empty"),
                             "--output", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 2
    assert "holds no TensorBoard event file" in result.stderr


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit):
        main([str(tmp_path / "nope"), "--output", str(tmp_path / "r")])
