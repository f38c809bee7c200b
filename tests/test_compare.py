"""`diffv2-lit compare` on real TensorBoard event files, and on the run folders `diffv2-lit fit` writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.colors
import matplotlib.image
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from diffv2_lit import compare
from diffv2_lit.cli.compare import main

TOKENS_PER_STEP = 4 * 32  # the fixtures' batch: 4 sequences of 32 tokens


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


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), "--output", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == (f"diffv2-lit compare: error: {tmp_path / 'nope'} does not exist; pass folders "
                                       "written by `diffv2-lit fit` (e.g. runs/NAME).\n")


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


def _number(cell: str) -> float:
    """A table cell as a number: `7,512`, `16.6k`, `1.2M`, `12.3%`, `2.722`."""
    cell = cell.replace(",", "")
    scale = {"k": 1e3, "M": 1e6, "G": 1e9, "%": 1e-2}.get(cell[-1], 1.0)
    return float(cell.rstrip("kMG%")) * scale


def _median(values):
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def test_table_summarises_each_column_over_the_stated_window(quickstart_twin_runs, tmp_path):
    """tokens/s: the median over the last 10% of the steps, at least the last 5 values, read here from the event
    files (the DIFF V2 run joined from its two pieces: version_2 restarted at step 3); the window is stated."""
    assert main([str(quickstart_twin_runs), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    rows, header = _table_rows(page), page[page.index("| run |"):].splitlines()[0]
    column = [c.strip() for c in header.strip("|").split("|")][1:].index
    first, restart = (_scalars(quickstart_twin_runs / v, "perf/tokens_per_sec") for v in ("version_0", "version_2"))
    baseline = _scalars(quickstart_twin_runs / "version_1", "perf/tokens_per_sec")
    for label, points in (("quickstart-diffv2", [p for p in first if p[0] < restart[0][0]] + restart),
                          ("quickstart-baseline", baseline)):
        assert [step for step, _ in points] == list(range(6))  # 6 steps: the last 10% is step 5 alone
        expected = _median([value for _, value in points[-5:]])
        assert _number(rows[label][column("tokens/s")]) == pytest.approx(expected, rel=5e-3)
    assert "median of the values logged over the last 10% of the run's steps" in page
    assert "at least its last 5 values" in page
    val = _scalars(quickstart_twin_runs / "version_1", "val/loss")
    assert _number(rows["quickstart-baseline"][column("final val loss")]) == pytest.approx(val[-1][1], rel=5e-4)
    assert rows["quickstart-baseline"][column("MFU")] == "–"  # a CPU run: explained, with the fix
    assert "MFU –: no dense peak FLOP rate is known for the device" in page and "peak_flops" in page
    memory = _scalars(quickstart_twin_runs / "version_1", "perf/peak_memory_gb")
    assert _number(rows["quickstart-baseline"][column("peak memory GB")]) == pytest.approx(
        max(value for _, value in memory), rel=5e-3)


def test_one_slow_last_window_does_not_set_the_tokens_per_second(tmp_path):
    """The issue's run: about 7.5k tokens/s throughout, 865 in the last window (it held a text sample)."""
    writer = SummaryWriter(str(tmp_path / "runs" / "slow-end" / "version_0"))
    rates = [7400, 7600, 7500, 7450, 7550, 7480, 7520, 865]
    for index, rate in enumerate(rates):
        writer.add_scalar("perf/tokens_per_sec", rate, 10 * index + 9)
        writer.add_scalar("train/loss", 2.0, 10 * index + 9)
    writer.close()
    assert main([str(tmp_path / "runs"), "--output", str(tmp_path / "report")]) == 0
    row = _table_rows((tmp_path / "report" / "report.md").read_text())["slow-end"]
    assert _number(row[4]) == pytest.approx(_median([7550, 7480, 7520, 865, 7450]), rel=5e-3)  # the last 5 values


def test_numbers_read_as_people_write_them(tmp_path):
    """16.6k rather than 1.659e+04; MFU in percent; no MFU footnote where every run has an MFU."""
    for name, rate in (("fast", 16590.0), ("slow", 7512.3)):
        writer = SummaryWriter(str(tmp_path / "runs" / name / "version_0"))
        writer.add_scalar("perf/tokens_per_sec", rate, 9)
        writer.add_scalar("perf/mfu", 0.1234, 9)
        writer.add_scalar("val/loss", 2.72234, 9)
        writer.close()
    assert main([str(tmp_path / "runs"), "--output", str(tmp_path / "report")]) == 0
    page = (tmp_path / "report" / "report.md").read_text()
    rows = _table_rows(page)
    assert rows["fast"][1] == "2.722" and rows["fast"][4] == "16.6k" and rows["slow"][4] == "7,512"
    assert rows["fast"][5] == "12.3%"
    assert "MFU –" not in page and "e+0" not in page


def test_charts_label_their_axes_with_units(quickstart_twin_runs):
    groups = compare.group_runs(compare.load_runs(compare.find_run_dirs([quickstart_twin_runs])))
    import matplotlib.pyplot as plt

    for title, chart in compare.CHARTS.items():
        lines = compare.chart_series(chart.tags, groups)
        if not lines:
            continue
        fig, _ = compare.draw_chart(title, chart, lines, groups)
        ax = fig.axes[0]
        fig.canvas.draw()
        assert ax.get_xlabel() == "tokens seen" and ax.get_ylabel(), title
        assert not any("e+" in t.get_text() or "e-" in t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()), title
        plt.close(fig)
    assert compare.CHARTS["train loss"].y_label == "cross-entropy (nats/token)"


def test_diff_charts_cover_the_whole_run_per_variant(quickstart_twin_runs):
    groups = compare.group_runs(compare.load_runs(compare.find_run_dirs([quickstart_twin_runs])))
    lam = compare.chart_series(compare.CHARTS["sigmoid(lambda) mean (DIFF)"].tags, groups)
    assert list(lam) == ["quickstart-diffv2"]  # the baseline has no lambda
    rms = compare.chart_series(compare.CHARTS["context RMS, mean"].tags, groups)
    assert set(rms) == {"quickstart-diffv2", "quickstart-baseline"}
    for line in rms.values():  # DiffMonitor ran at steps 0, 2, 4 of the 6: all drawn, on the token axis
        assert line.steps == [0, 2, 4] and line.x_label == "tokens" and line.cut_note is None
        assert line.x[0] == 0 and line.x[-1] == 4 * 4 * 32  # at the start of step 4: 4 steps of 4 x 32 tokens
    loss = compare.chart_series(compare.CHARTS["train loss"].tags, groups)["quickstart-diffv2"]
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
    lines = compare.chart_series(compare.CHARTS["train loss"].tags, groups)
    fig, _ = compare.draw_chart("train loss", compare.CHARTS["train loss"], lines, groups)
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


# ---- spikes, where they happened (a real fit whose detector flags often) ----------------------


@pytest.fixture(scope="module")
def spiky_twin_runs(tmp_path_factory):
    """The quickstart twins cut to 2 layers and 12 steps of 4 x 32 tokens, logged every 4th step, with a
    spike detector that flags any norm above its running level: spikes land between logged steps, as in
    a real run (about 20 s on two busy cores). Returns runs/quickstart."""
    import yaml

    from diffv2_lit.cli.fit import run_lightning_cli

    root = tmp_path_factory.mktemp("spiky")
    recipes = Path(__file__).resolve().parent.parent / "recipes"
    for recipe in ("quickstart", "quickstart-baseline"):
        config = yaml.safe_load((recipes / f"{recipe}.yaml").read_text())
        config["trainer"].update(max_steps=12, val_check_interval=6, log_every_n_steps=4, enable_progress_bar=False)
        config["model"]["architecture"].update(n_layers=2, dim=64, n_heads=2, n_kv_heads=1, head_dim=32, max_seq_len=64)
        config["model"].update(warmup_steps=2, lr=1e-1)
        config["data"]["init_args"].update(seq_len=32, batch_size=4, val_tokens=256)
        config["trainer"]["callbacks"] = [
            {"class_path": "diffv2_lit.callbacks.ThroughputMFU", "init_args": {"log_every_n_steps": 4}},
            {"class_path": "diffv2_lit.callbacks.GradientSpikeDetector",
             "init_args": {"warmup": 2, "factor": None, "z": 0.01, "min_rel_spread": 0.0, "max_consecutive": None}}]
        (root / f"{recipe}.yaml").write_text(yaml.safe_dump(config))
    cwd, cache = os.getcwd(), os.environ.get("DIFFV2_LIT_CACHE")
    os.chdir(root)
    os.environ["DIFFV2_LIT_CACHE"] = str(root / "cache")
    try:
        for recipe in ("quickstart", "quickstart-baseline"):
            run_lightning_cli(["fit", "--config", f"{recipe}.yaml"])
    finally:
        os.chdir(cwd)
        if cache is None:
            del os.environ["DIFFV2_LIT_CACHE"]
        else:
            os.environ["DIFFV2_LIT_CACHE"] = cache
    return root / "runs" / "quickstart"


def _scalars(run_dir, tag):
    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def test_spikes_are_marked_at_their_own_value_per_run(spiky_twin_runs, tmp_path):
    """Each run's spikes sit at spikes.jsonl's step and value, in the colour of the run's line, named in the
    legend; the logged gradient norm (every 4th step) does not even hold most of those steps."""
    expected, between_logged_steps = {}, 0
    for version, label in ((0, "quickstart-diffv2"), (1, "quickstart-baseline")):
        folder = spiky_twin_runs / f"version_{version}"
        records = [json.loads(line) for line in (folder / "spikes.jsonl").read_text().splitlines()]
        assert records, f"the detector flagged nothing in {folder}"
        expected[label] = [[r["step"] * TOKENS_PER_STEP, r["value"]] for r in records]
        logged = {step for step, _ in _scalars(folder, "train/grad_norm")}
        between_logged_steps += sum(r["step"] not in logged for r in records)
    assert between_logged_steps > 0

    assert main([str(spiky_twin_runs), "--output", str(tmp_path / "report")]) == 0
    assert (tmp_path / "report" / "gradient_norm_before_clipping.png").stat().st_size > 1000
    groups = compare.group_runs(compare.load_runs(compare.find_run_dirs([spiky_twin_runs])))
    chart = compare.CHARTS["gradient norm (before clipping)"]
    fig, notes = compare.draw_chart("g", chart, compare.chart_series(chart.tags, groups), groups)
    ax = fig.axes[0]
    line_colour = {line.get_label().split(" (n=")[0]: matplotlib.colors.to_rgba(line.get_color())
                   for line in ax.get_lines()}
    markers = {c.get_label().split(":")[0]: c for c in ax.collections}
    assert set(markers) == set(expected) and notes == []
    for label, points in expected.items():
        assert markers[label].get_offsets().ravel().tolist() == pytest.approx([v for point in points for v in point])
        assert tuple(markers[label].get_edgecolor()[0]) == pytest.approx(line_colour[label])
    assert line_colour["quickstart-diffv2"] != line_colour["quickstart-baseline"]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert f"quickstart-diffv2: spike{'s' if len(expected['quickstart-diffv2']) > 1 else ''} " \
           f"({len(expected['quickstart-diffv2'])})" in legend


def test_a_resumed_runs_spikes_come_from_the_piece_that_reaches_further(tmp_path, capsys):
    """A restart from step 3 replays steps 3-5: the first piece's spike at step 4 is not the run's any more.
    A non-finite spike sits on the chart's top edge; a line cut short by a crash is named and left out."""
    pieces = {0: (range(6), ['{"step": 2, "kind": "grad_norm", "value": 5.0}',
                             '{"step": 4, "kind": "grad_norm", "value": 6.0}']),
              1: (range(3, 8), ['{"step": 5, "kind": "grad_norm", "value": 7.0}',
                                '{"step": 6, "kind": "non_finite_grad_norm", "value": "nan"}', '{"step": 7, "ki'])}
    for version, (steps, lines) in pieces.items():
        folder = tmp_path / "runs" / "tiny" / f"version_{version}"
        writer = SummaryWriter(str(folder))
        for step in steps:
            writer.add_scalar("train/grad_norm", 1.0, step)
            writer.add_scalar("perf/tokens_seen", 100.0 * (step + 1), step)
        writer.close()
        (folder / "config.yaml").write_text("seed_everything: 1\nmodel: {lr: 0.1}\n")
        (folder / "spikes.jsonl").write_text("\n".join(lines) + "\n")
    groups = compare.group_runs(compare.load_runs(compare.find_run_dirs([tmp_path / "runs"])))
    assert list(groups) == ["tiny"] and len(groups["tiny"][0].pieces) == 2
    warning = capsys.readouterr().err
    assert "version_1/spikes.jsonl, line 3: not a spike record" in warning
    chart = compare.CHARTS["gradient norm (before clipping)"]
    fig, _ = compare.draw_chart("g", chart, compare.chart_series(chart.tags, groups), groups)
    finite, non_finite = fig.axes[0].collections
    assert finite.get_offsets().tolist() == [[200.0, 5.0], [500.0, 7.0]]
    assert non_finite.get_offsets().tolist() == [[600.0, 1.0]] and non_finite.get_label() == "tiny: non-finite (1)"
