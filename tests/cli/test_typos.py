"""A mistyped key, nested or not, on the command line or in YAML: one line naming the key as the user wrote it
and the key they meant; no flag is silently read as a longer one (issue 25.1)."""

import subprocess
import sys
from pathlib import Path

import pytest

from tests.faults.helpers import TINY, diffv2_lit, env

QUICKSTART = Path(__file__).parents[2] / "recipes" / "quickstart.yaml"
EXIT_USAGE = 2

# what the user adds to `fit --config recipes/quickstart.yaml` -> the start of the one line it must print
COMMAND_LINE = {
    "--data.tokeniser x": "data.tokeniser: TokenDataModule has no option 'tokeniser'; did you mean 'tokenizer'?",
    "--data.init_args.tokeniser x":
        "data.init_args.tokeniser: TokenDataModule has no option 'tokeniser'; did you mean 'tokenizer'?",
    "--model.architecture.n_layer 2":
        "model.architecture.n_layer: Architecture has no option 'n_layer'; did you mean 'n_layers'?",
    "--trainer.callbacks+=ModelCheckpoint --trainer.callbacks.every_n_train_step 3":
        "trainer.callbacks.every_n_train_step: ModelCheckpoint has no option 'every_n_train_step'; "
        "did you mean 'every_n_train_steps'?",
    "--trainer.max_stepz 3": "unrecognized arguments: --trainer.max_stepz 3; did you mean --trainer.max_steps?",
    "--modle.lr 1e-3": "unrecognized arguments: --modle.lr 1e-3; did you mean --model.lr?",
    # a prefix of a real flag is a typo too, not that flag (argparse's abbreviations are off)
    "--trainer.max_step 3": "unrecognized arguments: --trainer.max_step 3; did you mean --trainer.max_steps?",
}
YAML = {
    "data:\n  tokeniser: byte\n": "data.tokeniser: TokenDataModule has no option 'tokeniser'; did you mean 'tokenizer'?",
    "data:\n  class_path: diffv2_lit.data.datamodule.TokenDataModule\n  init_args:\n    tokeniser: byte\n":
        "data.init_args.tokeniser: TokenDataModule has no option 'tokeniser'; did you mean 'tokenizer'?",
    "model:\n  architecture: {preset: quickstart, n_layer: 2}\n":
        "model.architecture.n_layer: Architecture has no option 'n_layer'; did you mean 'n_layers'?",
    "trainer:\n  max_step: 3\n":
        "Subcommand 'fit' does not accept option 'trainer.max_step'; did you mean 'trainer.max_steps'?",
}


def _error_line(args: list[str], tmp_path, monkeypatch, capsys) -> str:
    """`diffv2-lit fit ...` in this process (each case ends before training; a process each costs ~10 s)."""
    from diffv2_lit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffv2-lit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USAGE, stderr
    assert not (tmp_path / "runs").exists()
    error = stderr[stderr.index("diffv2-lit fit: error: "):].strip()
    assert len(error.splitlines()) == 1, error
    return error[len("diffv2-lit fit: error: "):]


@pytest.mark.parametrize("typed", COMMAND_LINE)
def test_a_mistyped_flag_is_named_with_the_one_meant(typed, tmp_path, monkeypatch, capsys):
    import shlex

    line = _error_line(["fit", "--config", str(QUICKSTART), *shlex.split(typed)], tmp_path, monkeypatch, capsys)
    assert line.startswith(COMMAND_LINE[typed]), line


@pytest.mark.parametrize("text", YAML)
def test_a_mistyped_yaml_key_is_named_with_the_one_meant(text, tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.yaml").write_text(text)
    line = _error_line(["fit", "--config", str(QUICKSTART), "--config", "mine.yaml"], tmp_path, monkeypatch, capsys)
    assert line.startswith(YAML[text]), line


def test_nothing_close_lists_the_options(tmp_path, monkeypatch, capsys):
    line = _error_line(["fit", "--config", str(QUICKSTART), "--data.zzz", "1"], tmp_path, monkeypatch, capsys)
    assert line.startswith("data.zzz: TokenDataModule has no option 'zzz'; its options: data_dir, mix, seq_len,"), line
    assert line.endswith("(`diffv2-lit fit --data.help TokenDataModule` describes them)")


def test_the_console_script_names_the_nested_typo(tmp_path):
    """The user's command as written, through `diffv2-lit`: exit 2 and one line on stderr."""
    result = diffv2_lit(tmp_path, "fit", "--config", str(TINY), "--data.init_args.alphabett", "8")
    assert result.returncode == EXIT_USAGE, result.stderr
    assert result.stderr.strip().splitlines() == [
        "diffv2-lit fit: error: data.init_args.alphabett: SyntheticDataModule has no option 'alphabett'; did you "
        "mean 'alphabet'?  (`diffv2-lit fit --data.help SyntheticDataModule` describes them)"]


@pytest.mark.parametrize("command, full", [
    (["prepare", "--input", "texts", "--out", "data"], "--output"),
    (["train-tokenizer", "--input", "texts", "--out", "tok.json", "--vocab-size", "300"], "--output"),
    (["generate", "--ck", "model.ckpt"], "--ckpt"),
    (["export", "--ck", "model.ckpt", "--output", "export"], "--ckpt"),
    (["compare", "runs", "--out", "report"], "--output"),
])
def test_tools_refuse_abbreviated_flags(command, full, tmp_path):
    """`prepare --out data` used to run as `--output data`; now the flag it meant is named as missing."""
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("Some text of one's own, long enough to tokenize. " * 200)
    result = diffv2_lit(tmp_path, *command)
    assert result.returncode == EXIT_USAGE, result.stdout + result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        f"diffv2-lit {command[0]}: error: the following arguments are required: {full}", result.stderr
    assert not any((tmp_path / name).exists() for name in ("data", "tok.json", "export", "report"))
