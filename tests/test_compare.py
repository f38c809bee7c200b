"""`diffv2-lit compare` on real TensorBoard event files, and on the run folders `diffv2-lit fit` writes."""

import subprocess
import sys

import matplotlib.image
import pytest
from torch.utils.tensorboard import SummaryWriter

from diffv2_lit import compare
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


# ---- the folders real runs leave (the quickstart_twin_runs fixture: tests/conftest.py) ---------


def _table_rows(page: str) -> dict[str, list[str]]:
    rows = [line.strip("|").split("|") for line in page.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_twins_in_one_logger_folder_are_two_groups(quickstart_twin_runs, tmp_path, capsys):
    assert main([str(quickstart_twin_runs), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    rows = _table_rows(page)
    assert set(rows) == {"quickstart-diffv2", "quickstart-baseline"}, page
    assert rows["quickstart-diffv2"][0] == "1" and rows["quickstart-baseline"][0] == "1"  # the restart is no second seed
    assert "- `quickstart-diffv2`: " in page and "version_0` + `" in page and "version_2`" in page
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 2, warnings  # one line for each folder left by a failed run
    assert "skipping" in warnings[0] and "version_3" in warnings[0] and "version_4" in warnings[1]


def test_diff_charts_cover_the_whole_run_per_variant(quickstart_twin_runs):
    groups = compare.group_runs(compare.load_runs(compare.find_run_dirs([quickstart_twin_runs])))
    lam = compare.chart_series(compare.CHARTS["sigmoid(lambda) mean (DIFF)"], groups)
    assert list(lam) == ["quickstart-diffv2"]  # the baseline has no lambda
    rms = compare.chart_series(compare.CHARTS["context RMS, mean"], groups)
    assert set(rms) == {"quickstart-diffv2", "quickstart-baseline"}
    for line in rms.values():  # DiffMonitor ran at steps 0, 2, 4 of the 6: all drawn, on the token axis
        assert line.steps == [0, 2, 4] and line.x_label == "tokens" and line.cut_note is None
        assert line.x[0] == 0 and line.x[-1] == 4 * 4 * 32  # at the start of step 4: 4 steps of 4 x 32 tokens
    loss = compare.chart_series(compare.CHARTS["train loss"], groups)["quickstart-diffv2"]
    assert loss.steps == list(range(6))  # steps 0-2 from the first piece, 3-5 from the restart


def test_help_says_where_the_variant_is_read(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "config.yaml" in capsys.readouterr().out


def test_a_group_mean_cut_to_its_shortest_seed_is_said(tmp_path):
    _write_run(tmp_path / "runs" / "tiny-seed0" / "version_0", [3.0, 2.0, 1.5, 1.2, 1.0])
    _write_run(tmp_path / "runs" / "tiny-seed1" / "version_0", [3.0, 2.1])
    assert main([str(tmp_path / "runs"), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    assert "`tiny`: the mean stops at step 1, where its shortest seed stops (its longest reaches step 4)" in page


def test_short_series_are_visible(tmp_path):
    """One logged point draws a marker: without one, a line through a single point leaves no pixel."""
    _write_run(tmp_path / "runs" / "one-step" / "version_0", [3.0])
    groups = compare.group_runs(compare.load_runs(compare.find_run_dirs([tmp_path / "runs"])))
    lines = compare.chart_series(compare.CHARTS["train loss"], groups)
    fig = compare.draw_chart("train loss", lines, groups, compare.CHARTS["train loss"])
    ax = fig.axes[0]
    ax.get_legend().remove()
    fig.savefig(tmp_path / "chart.png", dpi=110)  # as the report
    pixels = matplotlib.image.imread(tmp_path / "chart.png")[..., :3]
    blue = (abs(pixels - [0.12, 0.47, 0.71]).max(axis=-1) < 0.1).sum()  # matplotlib's first colour, C0
    assert blue > 5


def test_nothing_left_to_compare_is_a_clear_error(tmp_path):
    (tmp_path / "runs" / "tiny" / "version_0").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "version_1").mkdir()
    result = subprocess.run([sys.executable, "-m", "diffv2_lit", "compare", str(tmp_path / "runs"),
                             "--output", str(tmp_path / "r")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("warning: skipping") == 2
    assert "error: no run with logged values" in result.stderr
