"""docs/training.md's walk from one's own text on a CPU, as written, into its own run folder; `fit --help` points
to the nested classes' help, and `--print_config` shows what the preset resolves to (issue 25.2)."""

import sys
from pathlib import Path

import pytest
import yaml

from diffv2_lit.checkpoint.safe_load import load_file
from diffv2_lit.model import ModelConfig
from tests.test_readme import _run, _workdir, bash_commands

ROOT = Path(__file__).parents[2]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
QUICK = ["--trainer.val_check_interval", "2", "--data.init_args.val_tokens", "1024",
         "--trainer.callbacks.max_new_tokens", "8"]


def cpu_walk_commands() -> list[str]:
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## From your own text on a CPU"):]
    return bash_commands(section[:section.index("\n## ", 3)])


@pytest.mark.slow
def test_the_cpu_walk_from_own_text_lands_in_its_own_run_folder(tmp_path):
    cwd = _workdir(tmp_path)
    commands = cpu_walk_commands()
    assert [c.split()[1] for c in commands] == ["prepare", "fit", "fit", "validate"]
    _run(commands[0], [], cwd)
    fitted = _run(commands[1], ["--trainer.max_steps", "4", *QUICK], cwd)
    resumed = _run(commands[2], ["--trainer.max_steps", "6", *QUICK], cwd)
    validated = _run(commands[3], ["--data.init_args.val_tokens", "1024"], cwd)

    runs = cwd / "runs"
    assert sorted(p.name for p in runs.iterdir()) == ["mine"]  # not beside the quickstart's runs/quickstart/
    assert "logs and resolved config: runs/mine/version_0" in fitted.stdout
    assert "resuming from runs/mine/version_0/checkpoints/last.ckpt (step 4)" in resumed.stdout
    assert "runs/mine/version_1/checkpoints/last.ckpt" in validated.stdout
    saved = yaml.safe_load((runs / "mine" / "version_0" / "config.yaml").read_text())
    assert saved["data"]["init_args"]["data_dir"] == "data/mine"
    last = load_file(runs / "mine" / "version_1" / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 6 and last["hyper_parameters"]["tokenizer"] == "byte"


def _in_process(args: list[str], monkeypatch, capsys) -> str:
    from diffv2_lit.cli import main

    monkeypatch.setattr(sys, "argv", ["diffv2-lit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out = capsys.readouterr().out
    assert exit_info.value.code in (0, None), out
    return out


def test_fit_help_points_to_the_nested_classes_help_and_those_work(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    help_text = " ".join(_in_process(["fit", "--help"], monkeypatch, capsys).split())
    assert "`--data.help TokenDataModule`" in help_text and "`--model.architecture.help Architecture`" in help_text
    data_help = _in_process(["fit", "--data.help", "TokenDataModule"], monkeypatch, capsys)
    assert "--data.tokenizer TOKENIZER" in data_help and "--data.val_tokens VAL_TOKENS" in data_help
    architecture_help = _in_process(["fit", "--model.architecture.help", "Architecture"], monkeypatch, capsys)
    assert "--model.architecture.n_layers N_LAYERS" in architecture_help
    assert "--model.architecture.attention ATTENTION" in architecture_help


def test_print_config_shows_what_the_preset_resolves_to(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    printed = _in_process(["fit", "--config", str(QUICKSTART), "--model.architecture.n_layers", "2", "--print_config"],
                          monkeypatch, capsys)
    architecture = yaml.safe_load(printed)["model"]["architecture"]
    preset = ModelConfig.from_preset("quickstart")
    assert architecture["n_layers"] == 2  # the override
    assert (architecture["dim"], architecture["n_heads"], architecture["n_kv_heads"], architecture["vocab_size"]) == \
        (preset.dim, preset.n_heads, preset.n_kv_heads, preset.vocab_size)  # the preset's, not null
    assert None not in architecture.values(), architecture

    # the printed file is a config that builds the same model (parse_config parses without the `fit` subcommand,
    # whose own keys it does not know)
    config = {k: v for k, v in yaml.safe_load(printed).items() if k not in ("ckpt_path", "weights_only")}
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(config))
    from diffv2_lit.cli.fit import parse_config
    from diffv2_lit.model import resolve_model_config

    again = parse_config([str(tmp_path / "printed.yaml")])
    assert resolve_model_config(again.model.architecture.as_dict()) == preset.replace(n_layers=2)
