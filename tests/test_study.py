"""The study driver builds the right run names, configs and command lines (no training)."""

import importlib.util
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("study", ROOT / "benchmarks" / "study.py")
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_names_carry_variant_and_group_by_seed():
    from diffv2_lit.compare import SEED_SUFFIX

    assert study.lr_tag(3e-3) == "3e-3" and study.lr_tag(0.05) == "5e-2"
    name = study.run_name("control-baseline", 5e-2, 2)
    assert name == "control-baseline-lr5e-2-seed2"
    assert SEED_SUFFIX.sub("", name) == "control-baseline-lr5e-2"
    for model, (_, attention) in study.MODELS.items():
        assert attention in model  # compare then labels the run by its name alone


def test_derived_config_changes_only_the_study_knobs(tmp_path):
    recipe = yaml.safe_load(study.RECIPE.read_text())
    config = study.derived_config(recipe, "control-baseline", 5e-2, 3, 200, tmp_path, 100, 8192)
    assert config["seed_everything"] == 3
    assert config["model"]["architecture"] == {"preset": "quickstart-control", "attention": "baseline"}
    assert config["model"]["lr"] == 5e-2 and config["trainer"]["max_steps"] == 200
    paths = [cb["class_path"] for cb in config["trainer"]["callbacks"]]
    assert any(p.endswith("GradientSpikeDetector") for p in paths) and any(p.endswith("DiffMonitor") for p in paths)
    assert not any(p.endswith(("SampleText", "ModelCheckpoint")) for p in paths)
    assert config["trainer"]["logger"]["init_args"]["name"] == "control-baseline-lr5e-2-seed3"
    assert config["data"] == {**recipe["data"], "init_args": {**recipe["data"]["init_args"], "val_tokens": 8192}}
    assert recipe["model"]["lr"] == 3e-3  # the recipe itself is untouched
    assert study.fit_command(Path("c.yaml"))[-4:] == ["diffv2_lit", "fit", "--config", "c.yaml"]


def test_plan_is_seed_major():
    runs = study.plan(["baseline", "diffv2"], [3e-3], [1, 2])
    assert [s for _, _, s in runs] == [1, 1, 2, 2]
