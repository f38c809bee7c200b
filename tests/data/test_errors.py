"""Every data error says what is wrong and how to fix it (found at setup, not inside a worker)."""

import json

import pytest

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.data.folder import DataError
from diffv2_lit.cli.prepare import main as prepare_main
from diffv2_lit.data.tokenizer import train_bpe
from tests.data.conftest import make_docs, write_jsonl


def _setup(**kwargs):
    kwargs = {"seq_len": 16, "batch_size": 2, "num_workers": 0, **kwargs}
    dm = TokenDataModule(**kwargs)
    dm.setup("fit")
    return dm


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"does not exist; create it with `diffv2-lit prepare"):
        _setup(data_dir=str(tmp_path / "nope"))


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty; create it with"):
        _setup(data_dir=str(tmp_path / "empty"))


def test_folder_that_is_not_litdata(tmp_path):
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("raw text, not prepared")
    with pytest.raises(DataError, match="is not a LitData output"):
        _setup(data_dir=str(tmp_path / "texts"))


def test_litdata_folder_of_other_items(corpus_dir):
    index_file = corpus_dir / "train" / "index.json"
    index = json.loads(index_file.read_text())
    index["config"]["item_loader"] = "PyTreeLoader"
    index_file.write_text(json.dumps(index))
    with pytest.raises(DataError, match="written with PyTreeLoader, not token chunks"):
        _setup(data_dir=str(corpus_dir))


def test_truncated_chunk_is_named(corpus_dir):
    chunk = sorted((corpus_dir / "train").glob("chunk-*.bin"))[1]
    data = chunk.read_bytes()
    chunk.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=rf"chunk file .*{chunk.name} is corrupt or truncated: {len(data) // 2} bytes"):
        _setup(data_dir=str(corpus_dir))


def test_truncated_val_chunk_is_named_too(corpus_dir):
    """The validation split is checked like the training split (it once was read unchecked)."""
    chunk = sorted((corpus_dir / "val").glob("chunk-*.bin"))[0]
    chunk.write_bytes(chunk.read_bytes()[:10])
    with pytest.raises(DataError, match=rf"chunk file {chunk} is corrupt or truncated: 10 bytes on disk, "
                                        rf"index.json says \d+; re-run `diffv2-lit prepare --output {corpus_dir} "):
        _setup(data_dir=str(corpus_dir))


def test_missing_chunk_is_named(corpus_dir):
    chunk = sorted((corpus_dir / "train").glob("chunk-*.bin"))[0]
    chunk.unlink()
    with pytest.raises(DataError, match=rf"chunk file .*{chunk.name} is missing"):
        _setup(data_dir=str(corpus_dir))


def test_seq_len_longer_than_data(corpus_dir):
    # Chunks hold ~2048 tokens and blocks never cross chunks.
    with pytest.raises(DataError, match=r"data.seq_len=4096 .* is more than .* lower seq_len"):
        _setup(data_dir=str(corpus_dir), seq_len=4096)


@pytest.mark.parametrize("weights, message", [
    ([0, 0], "do not sum to a positive number"),
    ([1, -1], "weight must be a finite number >= 0"),
])
def test_bad_mix_weights(corpus_dir, weights, message):
    mix = [{"path": str(corpus_dir), "weight": w} for w in weights]
    with pytest.raises(DataError, match=message):
        TokenDataModule(mix=mix)


def test_mix_entry_without_path():
    with pytest.raises(DataError, match=r"data.mix\[0\] must be a mapping with 'path'"):
        TokenDataModule(mix=[{"weight": 1.0}])


def test_tokenizer_mismatch(corpus_dir, tmp_path):
    path = tmp_path / "bpe.json"
    train_bpe(make_docs(50), vocab_size=280, show_progress=False).save(str(path))
    with pytest.raises(DataError, match=r"tokenizer mismatch: .* prepared with tokenizer 'byte' .* data.tokenizer is"):
        _setup(data_dir=str(corpus_dir), tokenizer=str(path))


def test_unknown_tokenizer_file():
    with pytest.raises(DataError, match="^data.tokenizer: tokenizer 'no/such/tokenizer.json' not found: pass 'byte' or "
                                        "the path of a Hugging Face tokenizer.json"):
        TokenDataModule(tokenizer="no/such/tokenizer.json")


def test_other_url_schemes_are_refused_not_written_locally(tmp_path, capsys, monkeypatch):
    # Before S3 support, a URL was taken for a local path: prepare wrote a folder named "gs:".
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match=r"gs://bucket/data: gs:// is not supported; use a local folder or an s3://"):
        TokenDataModule(data_dir="gs://bucket/data")
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(5))
    assert prepare_main(["--input", str(src), "--output", "gs://bucket/data", "--quiet"]) == 2
    assert "gs:// is not supported" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]
