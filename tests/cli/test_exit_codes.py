"""Every subcommand exits with the code docs/faults.md documents for each kind of error it can meet (issue 21.3):
1 for a run-time fault (a corrupt, untrusted or other model's checkpoint, data that is missing), 2 for bad usage
or configuration (a wrong flag, a path that does not exist, a bad data setting). Each case runs the real
subcommand on a real bad input, in this process through `diffv2_lit.cli.main` (what the console script calls),
and checks the code and that the one error line names the problem; a few run as processes through the console
script, where the entry point itself is what is checked."""

from __future__ import annotations

import datetime
import importlib
import pkgutil
import re
import sys
from pathlib import Path

import pytest
import torch

import diffv2_lit
from diffv2_lit.errors import DiffV2Error
from tests.faults.helpers import TINY, diffv2_lit as console_script, output
from tests.inference.conftest import lightning_checkpoint, tiny_config, tiny_model

ROOT = Path(__file__).parents[2]
FAULT, USAGE = 1, 2


# ---- real bad inputs -------------------------------------------------------------------------------


def _checkpoint(path: Path, **config) -> Path:
    """A real single-file checkpoint as DecoderLM writes it (the byte tokenizer's ids fit its vocabulary)."""
    torch.save(lightning_checkpoint(tiny_model(tiny_config(**config))), path)
    return path


def truncated_checkpoint(tmp_path: Path) -> Path:
    """A real checkpoint cut in half, as an interrupted copy leaves it."""
    path = _checkpoint(tmp_path / "cut.ckpt")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def untrusted_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint that needs more than data to load: it pickles a `datetime.date` (harmless, but not data)."""
    checkpoint = lightning_checkpoint(tiny_model(tiny_config()))
    checkpoint["hyper_parameters"]["saved_on"] = datetime.date(2026, 1, 1)
    torch.save(checkpoint, tmp_path / "untrusted.ckpt")
    return tmp_path / "untrusted.ckpt"


def damaged_sharded_folder(tmp_path: Path) -> Path:
    """A sharded checkpoint folder whose index is random bytes and whose `meta.pt` is gone."""
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(bytes(range(256)) * 4)
    (folder / "__0_0.distcp").write_bytes(b"\0" * 1024)
    return folder


def run(tmp_path: Path, monkeypatch, capsys, *args: str) -> tuple[int, str]:
    """`diffv2-lit ARGS` in this process: (exit code, the last line on stderr)."""
    from diffv2_lit.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DIFFV2_LIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", ["diffv2-lit", *args])
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    stderr = capsys.readouterr().err.strip()
    # The error is the last line (a traceback would follow it); what Lightning logged before it may vary in-process.
    return exit_info.value.code, (stderr.splitlines() or [""])[-1]


def expect(tmp_path, monkeypatch, capsys, code: int, named: list[str], *args: str) -> None:
    got, line = run(tmp_path, monkeypatch, capsys, *args)
    assert (got, line.startswith(f"diffv2-lit {args[0]}: error: ")) == (code, True), line
    for words in named:
        assert words in line, line


# ---- fit and validate ------------------------------------------------------------------------------

FIT = ("fit", "--config", str(TINY))


def test_fit(tmp_path, monkeypatch, capsys):
    ckpt = lambda: truncated_checkpoint(tmp_path)  # noqa: E731
    expect(tmp_path, monkeypatch, capsys, USAGE, ["--trainer.max_stepz"], *FIT, "--trainer.max_stepz", "3")
    expect(tmp_path, monkeypatch, capsys, USAGE, ["model.architecture.n_kv_heads", "n_kv_heads=3"],
           *FIT, "--model.architecture.n_kv_heads", "3")
    expect(tmp_path, monkeypatch, capsys, USAGE, ["data.batch_size must be >= 1"], *FIT, "--data.init_args.batch_size", "0")
    missing = tmp_path / "runs" / "nope.ckpt"
    expect(tmp_path, monkeypatch, capsys, USAGE, [str(missing), "does not exist"], *FIT, "--ckpt_path", str(missing))
    cut = ckpt()
    expect(tmp_path, monkeypatch, capsys, FAULT, [str(cut), "truncated"], *FIT, "--ckpt_path", str(cut))
    other = _checkpoint(tmp_path / "other.ckpt", attention="diffv2")  # a complete checkpoint of another model
    expect(tmp_path, monkeypatch, capsys, FAULT, ["model.architecture"], *FIT, "--ckpt_path", str(other))
    expect(tmp_path, monkeypatch, capsys, FAULT, [str(untrusted_checkpoint(tmp_path)), "datetime.date"],
           *FIT, "--ckpt_path", str(tmp_path / "untrusted.ckpt"))


def test_fit_on_a_data_folder_that_does_not_exist_is_a_data_fault(tmp_path, monkeypatch, capsys):
    data = tmp_path / "missing"
    expect(tmp_path, monkeypatch, capsys, FAULT, [f"data folder {data} does not exist"], *FIT,
           "--data", "diffv2_lit.data.datamodule.TokenDataModule", "--model.architecture.vocab_size", "320",
           "--data.init_args.data_dir", str(data))


def test_validate(tmp_path, monkeypatch, capsys):
    validate = ("validate", "--config", str(TINY))
    missing = tmp_path / "nope.ckpt"
    expect(tmp_path, monkeypatch, capsys, USAGE, [str(missing), "does not exist"], *validate, "--ckpt_path", str(missing))
    cut = truncated_checkpoint(tmp_path)
    expect(tmp_path, monkeypatch, capsys, FAULT, [str(cut), "truncated"], *validate, "--ckpt_path", str(cut))


# ---- the tools ---------------------------------------------------------------------------------------


def test_generate(tmp_path, monkeypatch, capsys):
    def generate(code, named, ckpt, *extra):
        expect(tmp_path, monkeypatch, capsys, code, named, "generate", "--ckpt", str(ckpt), "--prompt", "hi", *extra)

    cut = truncated_checkpoint(tmp_path)
    generate(FAULT, [str(cut), "not a readable PyTorch/Lightning checkpoint"], cut)
    generate(FAULT, ["untrusted.ckpt", "datetime.date"], untrusted_checkpoint(tmp_path))
    generate(FAULT, ["last.ckpt", "damaged"], damaged_sharded_folder(tmp_path))
    generate(USAGE, [str(tmp_path / "nope.ckpt"), "does not exist"], tmp_path / "nope.ckpt")
    good = _checkpoint(tmp_path / "good.ckpt")
    generate(USAGE, ["--top-k=0 must be at least 1"], good, "--top-k", "0")
    generate(USAGE, ["no/such/tokenizer.json"], good, "--tokenizer", "no/such/tokenizer.json")
    generate(USAGE, ["unrecognized arguments: --max-new-token"], good, "--max-new-token", "3")  # argparse's own


def test_export(tmp_path, monkeypatch, capsys):
    def export(code, named, ckpt, *extra):
        expect(tmp_path, monkeypatch, capsys, code, named, "export", "--ckpt", str(ckpt), "--output",
               str(tmp_path / "hf"), *extra)

    cut = truncated_checkpoint(tmp_path)
    export(FAULT, [str(cut), "not a readable PyTorch/Lightning checkpoint"], cut)
    export(FAULT, ["untrusted.ckpt", "datetime.date"], untrusted_checkpoint(tmp_path))
    export(USAGE, [str(tmp_path / "nope.ckpt"), "does not exist"], tmp_path / "nope.ckpt")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "notes.md").write_text("mine")
    export(USAGE, ["is not empty", "--overwrite"], _checkpoint(tmp_path / "good.ckpt"))
    export(USAGE, ["invalid choice: 'float64'"], _checkpoint(tmp_path / "good.ckpt"), "--dtype", "float64")


def test_consolidate(tmp_path, monkeypatch, capsys):
    def consolidate(code, named, source):
        expect(tmp_path, monkeypatch, capsys, code, named, "consolidate", str(source), str(tmp_path / "merged.ckpt"))

    folder = damaged_sharded_folder(tmp_path)
    consolidate(FAULT, [f"sharded checkpoint {folder} is damaged", "meta.pt", "is missing"], folder)
    consolidate(USAGE, [f"checkpoint folder {tmp_path / 'nope'} does not exist"], tmp_path / "nope")
    single = _checkpoint(tmp_path / "single.ckpt")
    consolidate(USAGE, [f"{single} is not a sharded checkpoint folder"], single)
    assert not (tmp_path / "merged.ckpt").exists()


def test_prepare(tmp_path, monkeypatch, capsys):
    def prepare(code, named, *args):
        expect(tmp_path, monkeypatch, capsys, code, named, "prepare", "--num-workers", "1", "--quiet", *args)

    prepare(USAGE, [f"input {tmp_path / 'nope.txt'} does not exist"], "--input", str(tmp_path / "nope.txt"),
            "--output", str(tmp_path / "out"))
    bad = tmp_path / "a.jsonl"
    bad.write_text('{"text": "fine"}\nnot json\n')
    prepare(USAGE, [f"{bad}, line 2: not valid JSON"], "--input", str(bad), "--output", str(tmp_path / "out"))
    text = tmp_path / "a.txt"
    text.write_text("To be, or not to be.\n")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.md").write_text("mine")
    prepare(USAGE, [f"{tmp_path / 'taken' / 'notes.md'}"], "--input", str(text), "--output", str(tmp_path / "taken"))
    prepare(USAGE, ["--val-fraction must be in [0, 1), got 1.5"], "--input", str(text), "--output",
            str(tmp_path / "out"), "--val-fraction", "1.5")
    prepare(USAGE, ["gs://x: gs:// is not supported"], "--input", str(text), "--output", "gs://x")  # unsupported URL: a data setting


def test_train_tokenizer(tmp_path, monkeypatch, capsys):
    def train(code, named, *args):
        expect(tmp_path, monkeypatch, capsys, code, named, "train-tokenizer", *args)

    text = tmp_path / "a.txt"
    text.write_text("To be, or not to be.\n" * 20)
    train(USAGE, [f"input {tmp_path / 'nope'} does not exist"], "--input", str(tmp_path / "nope"), "--output",
          str(tmp_path / "tok.json"))
    train(USAGE, ["--vocab-size 100 is too small"], "--input", str(text), "--output", str(tmp_path / "tok.json"),
          "--vocab-size", "100")
    (tmp_path / "tok.json").write_text("{}")
    train(USAGE, [f"{tmp_path / 'tok.json'} exists; pass --overwrite"], "--input", str(text), "--output",
          str(tmp_path / "tok.json"))


def test_compare(tmp_path, monkeypatch, capsys):
    expect(tmp_path, monkeypatch, capsys, USAGE, [f"{tmp_path / 'nope'} does not exist"], "compare",
           str(tmp_path / "nope"), "--output", str(tmp_path / "report"))
    (tmp_path / "runs").mkdir()
    expect(tmp_path, monkeypatch, capsys, USAGE, [f"{tmp_path / 'runs'} holds no TensorBoard event file"], "compare", str(tmp_path / "runs"),
           "--output", str(tmp_path / "report"))


def test_plan(tmp_path, monkeypatch, capsys):
    expect(tmp_path, monkeypatch, capsys, USAGE, ["model.architecture.n_kv_heads"], "plan", "--config",
           str(ROOT / "recipes" / "quickstart.yaml"), "--model.architecture.n_kv_heads", "3")


# ---- through the console script ----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["generate", "export"])
def test_the_console_script_exits_1_for_a_corrupt_checkpoint(tmp_path, command):
    """The promise of README and docs/faults.md, as a shell sees it."""
    cut = truncated_checkpoint(tmp_path)
    args = {"generate": ["--prompt", "hi"], "export": ["--output", str(tmp_path / "hf")]}[command]
    result = console_script(tmp_path, command, "--ckpt", str(cut), *args)
    assert result.returncode == FAULT, output(result)[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"diffv2-lit {command}: error: {str(cut)!r} is not a readable PyTorch/Lightning checkpoint ("), lines


def test_the_console_script_exits_2_for_a_missing_path(tmp_path):
    result = console_script(tmp_path, "consolidate", str(tmp_path / "nope"), str(tmp_path / "merged.ckpt"))
    assert result.returncode == USAGE, output(result)[-3000:]
    assert result.stderr.strip() == f"diffv2-lit consolidate: error: checkpoint folder {tmp_path / 'nope'} does not exist."


# ---- the table in docs/faults.md is the classes' ------------------------------------------------------


def _error_classes() -> dict[str, type]:
    for module in pkgutil.walk_packages(diffv2_lit.__path__, "diffv2_lit."):
        if ".hf_modeling" not in module.name and module.name != "diffv2_lit.__main__":
            importlib.import_module(module.name)
    found, pending = {}, [DiffV2Error]
    while pending:
        cls = pending.pop()
        found[cls.__name__] = cls
        pending += cls.__subclasses__()
    return {name: cls for name, cls in found.items() if cls.__module__.startswith("diffv2_lit.")}


def _documented_codes() -> dict[str, int]:
    text = (ROOT / "docs" / "faults.md").read_text()
    table = text[text.index("## Exit codes"):]
    table = table[: table.index("\n## ", 4)]
    codes = {}
    for row in re.findall(r"^\| \*\*(\d+)\*\* \|(.*)$", table, re.M):
        codes |= {name: int(row[0]) for name in re.findall(r"`(\w+)`", row[1])}
    return codes


def test_every_error_class_has_the_code_docs_faults_md_gives_it():
    classes, documented = _error_classes(), _documented_codes()
    assert set(documented) == set(classes) - {"DiffV2Error"}, (set(documented) ^ set(classes))
    assert {name: classes[name].exit_code for name in documented} == documented
