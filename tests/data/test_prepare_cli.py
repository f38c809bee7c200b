"""`diffv2-lit prepare` as a command: refuse/overwrite, interrupted runs, summary, input errors."""

import json

import pytest

from diffv2_lit.cli.prepare import main
from diffv2_lit.data.prepare import PrepareError, prepare
from tests.data.conftest import make_docs, write_jsonl


def test_cli_writes_metadata_and_summary(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(30))
    out = tmp_path / "out"
    rc = main(["--input", str(src), "--output", str(out), "--num-workers", "1", "--chunk-size", "1000",
               "--val-fraction", "0.1", "--seed", "3"])
    assert rc == 0
    meta = json.loads((out / "diffv2_data.json").read_text())
    assert meta["tokenizer"]["name"] == "byte" and meta["tokenizer"]["vocab_size"] == 259
    assert meta["splits"]["val"]["documents"] == 3 and meta["splits"]["train"]["documents"] == 27
    assert meta["sources"] == ["a.jsonl"] and "--seed 3" in meta["command"]
    captured = capsys.readouterr()
    summary = captured.out
    assert "documents: 27 train, 3 val" in summary and "tokens/s" in summary and "MiB" in summary
    # Our own lines only: LitData's worker chatter and its account advert (~40 lines) stay hidden.
    assert "lightning.ai" not in summary + captured.err and "Worker 0" not in summary + captured.err
    assert len(summary.strip().splitlines()) <= 8


def test_refuses_existing_output_unless_overwrite(tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(10))
    out = tmp_path / "out"
    args = ["--input", str(src), "--output", str(out), "--num-workers", "1", "--quiet"]
    assert main(args) == 0
    first = (out / "diffv2_data.json").read_text()
    assert main(args) == 2
    assert "holds data prepared earlier; pass --overwrite" in capsys.readouterr().err
    assert (out / "diffv2_data.json").read_text() == first
    assert main(args + ["--overwrite", "--seed", "7"]) == 0
    assert json.loads((out / "diffv2_data.json").read_text())["split"]["seed"] == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "out"]  # no leftovers


@pytest.mark.parametrize("split, found", [
    ("--val-fraction=0.1", ""),  # the split reads every document first: found before any worker starts
    ("--val-tokens=0", "tokenizing failed, nothing was written: "),  # found by a tokenizer worker
])
def test_failed_run_leaves_nothing_that_looks_complete(tmp_path, capsys, split, found):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "also fine"}\nnot json\n')
    rc = main(["--input", str(src), "--output", str(tmp_path / "out"), "--num-workers", "1", "--quiet", split])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith(f"diffv2-lit prepare: error: {found}{src}, line 3: not valid JSON") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


@pytest.mark.parametrize("make_input, message", [
    (lambda d: d / "missing.txt", "does not exist"),
    (lambda d: (d / "x.csv").write_text("a,b") and d / "x.csv", "unsupported file type"),
    (lambda d: (d / "empty").mkdir() or d / "empty", "holds no .txt"),
])
def test_input_errors(tmp_path, make_input, message):
    with pytest.raises((PrepareError, FileNotFoundError, ValueError), match=message):
        prepare([str(make_input(tmp_path))], tmp_path / "out", verbose=False)


def test_jsonl_without_text_key_names_file_and_line(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(3), key="content")
    with pytest.raises(Exception, match=r"a.jsonl, line 1: no 'text' field \(set --text-key\)"):
        prepare([str(src)], tmp_path / "out", val_tokens=10, verbose=False)


def test_val_tokens_cannot_take_everything(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(3))
    with pytest.raises(PrepareError, match="would take all 3 documents"):
        prepare([str(src)], tmp_path / "out", val_tokens=10**6, verbose=False)
