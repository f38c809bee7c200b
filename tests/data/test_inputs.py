"""What counts as a document, and input files that cannot be read: `diffv2-lit prepare` as the user runs it."""

import json

import pytest

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.cli.prepare import main

ARGS = ["--num-workers", "1", "--quiet"]


def run(capsys, *args):
    """`diffv2-lit prepare ARGS` (in this process: the same main() the console script calls) -> (exit, stderr)."""
    code = main([*args, *ARGS])
    return code, capsys.readouterr().err


def metadata(out):
    return json.loads((out / "diffv2_data.json").read_text())


# ---------------------------------------------------------------- empty documents (issue 24.10)

def test_an_empty_file_beside_a_real_one_leaves_the_text_to_training(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a_empty.txt").write_text("")
    text = "to be or not to be, that is the question\n" * 20
    (raw / "b_real.txt").write_text(text)
    out = tmp_path / "out"
    code, err = run(capsys, "--input", str(raw), "--output", str(out))
    assert (code, err) == (0, "")
    splits = metadata(out)["splits"]
    assert splits["train"]["documents"] == 1 and splits["train"]["tokens"] == len(text) + 1  # + EOS
    assert splits["val"]["documents"] == 0
    dm = TokenDataModule(data_dir=str(out), seq_len=16, batch_size=2, num_workers=0)
    dm.setup("fit")  # the folder a fit reads is complete (it once had no train split: "index.json corrupt")
    assert len(next(iter(dm.train_dataloader()))[0]) == 2


def test_the_split_counts_only_documents_with_text(tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(12):
        (raw / f"empty{i:02d}.txt").write_text(" \n\t" if i % 2 else "")
    for i in range(4):
        (raw / f"real{i}.txt").write_text(f"document {i} " * 30)
    (raw / "lines.jsonl").write_text('{"text": ""}\n{"text": "   "}\n{"text": null}\n{"text": "a line"}\n')
    out = tmp_path / "out"
    code, _ = run(capsys, "--input", str(raw), "--output", str(out), "--val-fraction", "0.2")
    assert code == 0
    meta = metadata(out)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 5
    assert meta["splits"]["val"]["documents"] == 1  # round(0.2 x 5), not round(0.2 x 20 files and lines)


@pytest.mark.parametrize("split_args", [[], ["--val-fraction", "0"], ["--val-tokens", "100"]])
def test_a_corpus_of_only_empty_files_is_refused(tmp_path, capsys, split_args):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "a.txt").write_text("")
    (raw / "b.txt").write_text("\n\n  \n")
    (raw / "c.jsonl").write_text('{"text": ""}\n')
    code, err = run(capsys, "--input", str(raw), "--output", str(tmp_path / "out"), *split_args)
    assert code == 2
    assert err == (f"diffv2-lit prepare: error: the input holds no document with text: 3 file(s), all empty or "
                   f"whitespace only (e.g. {raw / 'a.txt'}); pass files that hold text\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


# ---------------------------------------------------------------- values that are not text (issue 24.8)

@pytest.mark.parametrize("value, kind", [
    (12345, "number"), (1.5, "number"), (True, "boolean"), (["a", "list"], "array"), ({"a": 1}, "object"),
])
def test_a_jsonl_value_that_is_not_a_string_is_refused(tmp_path, capsys, value, kind):
    src = tmp_path / "a.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + json.dumps({"text": value}) + "\n")
    code, err = run(capsys, "--input", str(src), "--output", str(tmp_path / "out"))
    assert code == 2
    assert err == (f"diffv2-lit prepare: error: {src}, line 2: 'text' is a JSON {kind} "
                   f"({json.dumps({'text': value})}), not a string; write the text as a string, or set --text-key to "
                   "the field holding it\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]


def test_a_parquet_column_that_is_not_strings_is_refused(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": [1, 2, 3]}), src)
    code, err = run(capsys, "--input", str(src), "--output", str(tmp_path / "out"))
    assert code == 2
    assert err == (f"diffv2-lit prepare: error: {src}: column 'text' holds int64 values, not strings; write the text "
                   "as a string column, or set --text-key to the column holding it\n")


def test_parquet_nulls_are_empty_documents(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "a.parquet"
    pq.write_table(pa.table({"text": ["one document", None, "", "another"]}), src)
    out = tmp_path / "out"
    assert run(capsys, "--input", str(src), "--output", str(out), "--val-fraction", "0")[0] == 0
    train = metadata(out)["splits"]["train"]
    assert train["documents"] == 2 and train["tokens"] == len("one document") + len("another") + 2


# ---------------------------------------------------------------- files that cannot be read (issue 25.7)

def _gz(data: bytes) -> bytes:
    import gzip

    return gzip.compress(data, mtime=0)


@pytest.mark.parametrize("name, content, message", [
    ("utf16.txt", "Sonnet 18\n".encode("utf-16"),
     "{path}: not UTF-8 text (it looks like UTF-16, invalid start byte at byte 0); convert it to UTF-8, e.g. "
     "`iconv -f UTF-16 -t UTF-8 FILE > FILE.utf8`"),
    ("latin1.txt", "caf\xe9 au lait\n".encode("latin-1"),
     "{path}: not UTF-8 text (invalid continuation byte at byte 3); convert it to UTF-8, e.g. "
     "`iconv -f LATIN1 -t UTF-8 FILE > FILE.utf8`"),
    ("cut.txt.gz", _gz(b"to be or not to be " * 200)[:60],
     "{path} is truncated (Compressed file ended before the end-of-stream marker was reached); copy or compress it "
     "again (`gzip -t FILE` checks one)"),
    ("cut.jsonl.gz", _gz(b'{"text": "a line of text"}\n' * 200)[:50],
     "{path} is truncated (Compressed file ended before the end-of-stream marker was reached); copy or compress it "
     "again (`gzip -t FILE` checks one)"),
    ("fake.txt.gz", b"plain text, never compressed\n",
     "{path} is not a valid gzip file (Not a gzipped file (b'pl')); copy or compress it again (`gzip -t FILE` "
     "checks one)"),
    ("broken.parquet", b"PAR1" + bytes(range(200)) * 3,
     "{path} is not a readable parquet file (Parquet magic bytes not found in footer. Either the file is corrupted or "
     "this is not a parquet file.); write it again, or convert it to .jsonl"),
], ids=["utf16", "latin1", "truncated-txt-gz", "truncated-jsonl-gz", "fake-gz", "corrupt-parquet"])
def test_an_unreadable_file_is_named_with_the_fix(tmp_path, capsys, name, content, message):
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "good.txt").write_text("fine text\n" * 10)
    path = raw / name
    path.write_bytes(content)
    code, err = run(capsys, "--input", str(raw), "--output", str(tmp_path / "out"))
    assert (code, err) == (2, f"diffv2-lit prepare: error: {message.format(path=path)}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_a_corrupt_tokenizer_file_is_one_line_for_prepare_and_the_data_module(tmp_path, capsys):
    from diffv2_lit.data.folder import DataError

    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": ')  # cut off mid-file
    src = tmp_path / "a.txt"
    src.write_text("some text\n")
    reason = f"tokenizer {bad} is not a valid Hugging Face tokenizer.json (EOF while parsing a value at line 1 column 28)"
    code, err = run(capsys, "--input", str(src), "--output", str(tmp_path / "out"), "--tokenizer", str(bad))
    assert (code, err) == (2, f"diffv2-lit prepare: error: {reason}; pass 'byte' or an intact tokenizer.json (e.g. "
                              "one written by `diffv2-lit train-tokenizer`)\n")
    with pytest.raises(DataError) as refused:
        TokenDataModule(tokenizer=str(bad))
    assert str(refused.value).startswith(f"data.tokenizer: {reason}")


@pytest.mark.parametrize("key", ["num_workers", "val_tokens"])
def test_a_negative_count_names_its_key(key):
    from diffv2_lit.data.folder import DataError

    with pytest.raises(DataError, match=rf"^data.{key} must be >= 0, got -3$"):
        TokenDataModule(**{key: -3})


def test_quiet_keeps_the_summary_and_drops_litdata_chunk_warnings(tmp_path):
    """A real process: LitData warns from its forked workers, straight to the terminal."""
    import subprocess
    import sys
    from pathlib import Path

    raw = tmp_path / "raw"
    raw.mkdir()
    for i in range(3):
        (raw / f"big{i}.txt").write_text(f"document {i} " * 400)  # ~5 kB each, chunks of 1 kB
    root = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "diffv2_lit", "prepare", "--input", str(raw), "--output", str(tmp_path / "out"),
         "--chunk-bytes", "1KB", "--num-workers", "1", "--quiet"],
        env={**__import__("os").environ, "PYTHONPATH": str(root), "LITDATA_DISABLE_VERSION_CHECK": "1"},
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == f"[prepare] wrote {tmp_path / 'out'}" and lines[1].startswith("  documents: 2 train, 1 val")
    assert len(lines) == 4


def test_a_validation_budget_beyond_the_split_is_said_once(corpus_dir):
    dm = TokenDataModule(data_dir=str(corpus_dir), seq_len=16, batch_size=2, num_workers=0, val_tokens=10**7)
    dm.setup("fit")
    with pytest.warns(UserWarning) as caught:
        first = len(dm.val_dataloader())
        assert len(dm.val_dataloader()) == first  # a second validation: the same blocks, no second warning
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1
    assert messages[0].startswith(f"data.val_tokens=10,000,000 is more than the validation split gives: "
                                  f"{corpus_dir / 'val'} holds ")
    assert "validating on all of them. Lower data.val_tokens" in messages[0]
