"""The study driver builds the right run names, configs and plan, and its summary reads real event files."""

import importlib.util
import math
import statistics
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(spec)
sys.modules["study"] = study  # dataclasses look their module up there
spec.loader.exec_module(study)


def test_names_carry_variant_optimizer_and_group_by_seed():
    from diffv2_lit.compare import SEED_SUFFIX

    assert study.lr_tag(3e-3) == "3e-3" and study.lr_tag(0.05) == "5e-2"
    name = study.run_name(study.Cell("control-baseline", "muon", 5e-2), 2)
    assert name == "control-baseline-muon-lr5e-2-seed2"
    assert SEED_SUFFIX.sub("", name) == "control-baseline-muon-lr5e-2"
    for arm, architecture in study.ARMS.items():
        assert architecture["attention"] in arm  # compare then labels the run by its name alone


def test_derived_config_changes_only_the_study_knobs(tmp_path):
    recipe = yaml.safe_load(study.RECIPE.read_text())
    cell = study.Cell("baseline-qknorm", "muon", 5e-2)
    config = study.derived_config(recipe, cell, 3, 200, tmp_path, 100, 8192, document_mask=True)
    assert config["seed_everything"] == 3
    assert config["model"]["architecture"] == {"preset": "quickstart", "attention": "baseline", "qk_norm": True}
    assert config["model"]["lr"] == 5e-2 and config["model"]["optimizer"] == "muon"
    assert config["trainer"]["max_steps"] == 200
    paths = [cb["class_path"] for cb in config["trainer"]["callbacks"]]
    assert any(p.endswith("GradientSpikeDetector") for p in paths) and any(p.endswith("DiffMonitor") for p in paths)
    assert not any(p.endswith(("SampleText", "ModelCheckpoint")) for p in paths)
    assert config["trainer"]["logger"]["init_args"]["name"] == "baseline-qknorm-muon-lr5e-2-seed3"
    assert config["data"] == {**recipe["data"], "init_args": {**recipe["data"]["init_args"], "val_tokens": 8192,
                                                              "document_mask": True}}
    assert recipe["model"]["lr"] == 3e-3 and "optimizer" not in recipe["model"]  # the recipe itself is untouched
    adamw = study.derived_config(recipe, study.Cell("diffv2", "adamw", 3e-3), 1, 200, tmp_path, 100, 8192, False)
    assert "optimizer" not in adamw["model"] and adamw["data"]["init_args"]["document_mask"] is False
    assert study.fit_command(Path("c.yaml"))[-4:] == ["diffv2_lit", "fit", "--config", "c.yaml"]


def test_default_grid_is_the_issue_22_grid_seed_major():
    args = study.parse_args([])
    cells = study.grid(args.arms, args.optimizers, args.lrs, args.stress_arms, args.stress_lrs)
    names = [c.name for c in cells]
    main = {f"{a}-{o}-lr3e-3" for a in ("baseline", "baseline-qknorm", "control-baseline", "diffv2")
            for o in ("adamw", "muon")}
    stress = {f"{a}-adamw-lr5e-2" for a in ("baseline", "baseline-qknorm", "diffv2")}
    assert set(names) == main | stress and len(names) == 11
    assert args.document_mask is True and args.steps >= 1200 and args.seeds == [1, 2, 3]
    runs = study.plan(cells, [1, 2])
    assert [s for _, s in runs] == [1] * 11 + [2] * 11


def test_loss_at_interpolates_between_validations():
    curve = [(10.0, 3.0), (20.0, 2.0), (40.0, 1.0)]
    assert study.loss_at(curve, 15.0) == pytest.approx(2.5)
    assert study.loss_at(curve, 30.0) == pytest.approx(1.5)
    assert study.loss_at(curve, 5.0) == 3.0 and study.loss_at(curve, 41.0) is None


def test_noise_verdict_against_hand_computed_pooled_std():
    def runs(losses):
        return [study.RunFigures(f"r{i}", "c", v, [], 1.0, 10, 0.0, None, None, {}) for i, v in enumerate(losses)]

    ours, theirs = [2.00, 2.02, 1.98], [2.10, 2.06, 2.08]  # stds 0.02 each: pooled 0.02, 2σ 0.04; Δ -0.08
    assert study.noise_verdict(runs(ours), runs(theirs)) == "-0.080 (outside the seed noise, 2σ = 0.040)"
    assert "inside" in study.noise_verdict(runs([2.00, 2.10, 1.90]), runs(theirs))  # std 0.1: 2σ 0.14 > 0.08


def test_summary_reads_real_event_files(tmp_path):
    """Two fake runs written with TensorBoard's own writer: the summary's figures equal hand computations."""
    from torch.utils.tensorboard import SummaryWriter

    out = tmp_path / "out"
    cells = [study.Cell("baseline", "adamw", 3e-3), study.Cell("diffv2", "adamw", 3e-3)]
    written = {}
    for cell, losses, speed in [(cells[0], [3.0, 2.5, 2.2], 1000.0), (cells[1], [2.9, 2.4, 2.0], 800.0)]:
        run_dir = out / study.run_name(cell, 1) / "version_0"
        writer = SummaryWriter(str(run_dir))
        for i, loss in enumerate(losses):
            step = 100 * (i + 1) - 1
            writer.add_scalar("val/loss", loss, step, walltime=1000.0 + 10 * (i + 1))
            writer.add_scalar("perf/tokens_per_sec", speed + i, step, walltime=1000.0 + 10 * (i + 1))
        writer.add_scalar("spike/count", 3.0, 299, walltime=1030.0)
        writer.add_scalar("train/loss", 3.5, 0, walltime=1000.0)
        writer.close()
        written[cell.name] = run_dir
    figures = [study.read_run(written[c.name], c.name) for c in cells]
    assert figures[0].steps == 300 and figures[0].seconds == pytest.approx(30.0)
    assert figures[0].val_curve == [(pytest.approx(10.0), 3.0), (pytest.approx(20.0), 2.5), (pytest.approx(30.0),
                                                                                             pytest.approx(2.2))]
    assert figures[1].tokens_per_sec == statistics.median([800.0, 801.0, 802.0])
    text = study.summarize(figures, cells, "cmd")
    row = next(line for line in text.splitlines() if line.startswith("| diffv2-adamw-lr3e-3"))
    assert "| 2.000 |" in row and "-0.200 (one seed: noise unknown)" in row
    assert f"| {1000 * 3 / 300:.1f} |" in row  # spikes per 1k steps
    assert math.isclose(study.loss_at(figures[1].val_curve, 30.0), 2.0, rel_tol=1e-6)
