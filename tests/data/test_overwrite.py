"""`prepare --overwrite` replaces an earlier prepare's output and nothing else (issue 24.1).

Every case writes the user's files for real, runs the command, and checks each of them byte for byte."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.data.folder import DataError
from diffv2_lit.cli.prepare import main
from tests.data.conftest import make_docs, write_jsonl

ROOT = Path(__file__).parents[2]


def snapshot(root: Path) -> dict[str, bytes]:
    """{relative path: content} of every file under root (hidden ones too)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_files(root: Path) -> Path:
    """A working folder as people have them: raw text beside notes and a thesis."""
    raw = root / "raw"
    raw.mkdir(parents=True)
    for i, doc in enumerate(make_docs(6)):
        (raw / f"doc{i}.txt").write_text(doc, encoding="utf-8")
    (root / "notes.md").write_text("my notes\n")
    (root / "thesis.tex").write_bytes(b"\\documentclass{article}\n" + bytes(range(256)))
    return raw


def prepare_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """The user's command as a real process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1",
           "DIFFV2_LIT_CACHE": str(cwd / ".cache")}
    return subprocess.run([sys.executable, "-m", "diffv2_lit", "prepare", *args, "--num-workers", "1", "--quiet"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("output, refusal", [
    ("raw", "output {work}/raw contains the input {work}/raw/doc0.txt; write the prepared data to a new folder"),
    (".", "output {work} contains the input {work}/raw/doc0.txt; write the prepared data to a new folder"),
    ("..", "output {parent} contains the input {work}/raw/doc0.txt"),
])
def test_overwrite_never_deletes_the_input_or_a_folder_holding_it(tmp_path, output, refusal):
    work = tmp_path / "work"
    user_files(work)
    before, around = snapshot(work), snapshot(tmp_path)
    result = prepare_cli(work, "--input", "raw", "--output", output, "--overwrite")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"diffv2-lit prepare: error: {refusal.format(work=work, parent=tmp_path)}")
    assert snapshot(work) == before and snapshot(tmp_path) == around


def test_overwrite_of_the_current_folder_is_refused(tmp_path):
    work = tmp_path / "work"
    raw = user_files(tmp_path / "elsewhere")
    work.mkdir()
    (work / "keep.txt").write_text("do not delete me")
    result = prepare_cli(work, "--input", str(raw), "--output", ".", "--overwrite")
    assert result.returncode == 2
    assert result.stderr == f"diffv2-lit prepare: error: output {work} is the current folder or holds it; name a new " \
                            "folder, e.g. --output prepared\n"
    assert snapshot(work) == {"keep.txt": b"do not delete me"}


def test_overwrite_of_a_prepared_folder_holding_a_user_file_names_it(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(10))
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--num-workers", "1", "--quiet"]
    assert main(args) == 0
    (out / "README.md").write_text("what this data is\n")  # the user documents the data next to it
    (out / "train" / "stats.csv").write_text("a,b\n")
    before = snapshot(tmp_path)
    assert main([*args, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err == (f"diffv2-lit prepare: error: --overwrite refused: it would delete {out}/README.md, which "
                   "`diffv2-lit prepare` did not write; --overwrite replaces only an earlier prepare's output: "
                   "choose a new --output\n")
    assert snapshot(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]  # no hidden partial folder left


def test_refusal_without_overwrite_does_not_recommend_it_for_other_files(tmp_path, capsys):
    raw = user_files(tmp_path)
    before = snapshot(tmp_path)
    assert main(["--input", str(raw), "--output", str(tmp_path / "out"), "--quiet"]) == 0  # a new folder: fine
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("todo\n")
    assert main(["--input", str(raw), "--output", str(notes), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == (f"diffv2-lit prepare: error: output {notes} already exists and holds files `diffv2-lit prepare` "
                   f"did not write (e.g. {notes}/todo.txt) (it has no diffv2_data.json: `diffv2-lit prepare` did not "
                   "write it); choose a new --output\n")
    assert "--overwrite" not in err
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("out/")} == {**before, "notes/todo.txt": b"todo\n"}


def test_a_bare_litdata_folder_is_not_prepare_output(tmp_path, capsys, corpus_dir):
    """Chunks and an index.json written by other tools (no diffv2_data.json): not --overwrite's to delete."""
    (corpus_dir / "diffv2_data.json").unlink()
    before = snapshot(corpus_dir)
    src = write_jsonl(tmp_path / "b.jsonl", make_docs(5))
    assert main(["--input", str(src), "--output", str(corpus_dir), "--overwrite", "--quiet"]) == 2
    assert f"--overwrite refused: it would delete {corpus_dir}/train/chunk-0-0.bin" in capsys.readouterr().err
    assert snapshot(corpus_dir) == before


def test_an_empty_folder_is_used_without_overwrite(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(10))
    (tmp_path / "out").mkdir()
    assert main(["--input", str(src), "--output", str(tmp_path / "out"), "--num-workers", "1", "--quiet"]) == 0
    assert (tmp_path / "out" / "diffv2_data.json").is_file()


def test_overwrite_replaces_only_what_prepare_wrote(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(40))
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--num-workers", "1", "--quiet", "--chunk-size", "500"]
    assert main(args) == 0
    assert main([*args[:-1], "5000", "--overwrite"]) == 0  # fewer, bigger chunks: the old ones must all go
    index = (out / "train" / "index.json").read_text()
    named = {f"train/{name}" for name in __import__("re").findall(r'"filename": "([^"]+)"', index)}
    assert {k for k in snapshot(out) if k.startswith("train/chunk-")} == named
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]


def test_fit_hint_on_raw_text_prepares_into_a_new_folder(tmp_path):
    """`data_dir` pointing at the raw text: the hint's command, run as written, keeps every file."""
    raw = user_files(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as refused:
        TokenDataModule(data_dir=str(raw), seq_len=8, batch_size=1).setup("fit")
    message = str(refused.value)
    target = tmp_path / "raw-prepared"
    assert message == (f"{raw} is not a LitData output (no diffv2_data.json and no index.json); it holds text "
                       f"({raw}/doc0.txt), not prepared data: prepare it into a new folder with `diffv2-lit prepare "
                       f"--input {raw} --output {target}` and set data.data_dir to {target}")
    command = message.split("`")[1].split()[2:]
    assert main([*command, "--quiet", "--val-fraction", "0.2"]) == 0
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("raw-prepared/")} == before
    TokenDataModule(data_dir=str(target), seq_len=8, batch_size=1, num_workers=0).setup("fit")
