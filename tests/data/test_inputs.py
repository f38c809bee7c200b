"""What counts as a document, and input files that cannot be read: `diffv2-lit prepare` as the user runs it."""

import json

import pytest

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.data.prepare import main

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
