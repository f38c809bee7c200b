"""prepare (txt, jsonl, parquet) -> stream back -> detokenize: the original documents, one EOS after each."""

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from litdata import StreamingDataset, TokensLoader

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.data.prepare import document_priority, prepare
from diffv2_lit.data.tokenizer import load_tokenizer
from tests.data.conftest import make_docs, write_jsonl


def _all_tokens(split_dir) -> np.ndarray:
    """Every token of a split, in chunk order (block_size=1 reads them one by one)."""
    ds = StreamingDataset(str(split_dir), item_loader=TokensLoader(block_size=1))
    return np.concatenate([np.asarray(ds[i]) for i in range(len(ds))])


def _documents(tokens: np.ndarray, tok) -> list[str]:
    assert tokens[-1] == tok.eos_id, "the last document must end with EOS"
    cuts = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(tokens[a:b]) for a, b in zip(starts, cuts)]


def _write_inputs(tmp_path, docs):
    """The same documents as .txt files, .jsonl(.gz) lines and parquet rows."""
    txt_dir = tmp_path / "txt"
    txt_dir.mkdir()
    for i, doc in enumerate(docs[:4]):
        (txt_dir / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    write_jsonl(tmp_path / "b.jsonl", docs[4:10], key="body")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"body": d}) + "\n" for d in docs[10:14])
    pq.write_table(pa.table({"body": docs[14:], "n": list(range(len(docs) - 14))}), tmp_path / "d.parquet")
    return [str(txt_dir), str(tmp_path / "b.jsonl"), str(tmp_path / "c.jsonl.gz"), str(tmp_path / "d.parquet")]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_round_trip_txt_jsonl_parquet(tmp_path, num_workers):
    docs = make_docs(20)
    inputs = _write_inputs(tmp_path, docs)
    meta = prepare(inputs, tmp_path / "out", text_key="body", val_fraction=0.2, chunk_size=300,
                   num_workers=num_workers, verbose=False)
    tok = load_tokenizer("byte")
    train = _documents(_all_tokens(tmp_path / "out" / "train"), tok)
    val = _documents(_all_tokens(tmp_path / "out" / "val"), tok)
    assert sorted(train + val) == sorted(docs)  # every document exactly once, unchanged
    assert len(val) == 4 and not set(train) & set(val)  # 20% of 20 documents, disjoint
    assert meta["splits"]["train"]["documents"] == 16
    assert meta["splits"]["train"]["tokens"] == sum(len(d.encode()) + 1 for d in train)


def test_split_is_deterministic_and_seeded(tmp_path):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(40))
    tok = load_tokenizer("byte")

    def val_docs(name, seed, workers):
        prepare([str(src)], tmp_path / name, seed=seed, val_fraction=0.25, num_workers=workers,
                chunk_size=500, verbose=False)
        return sorted(_documents(_all_tokens(tmp_path / name / "val"), tok))

    assert val_docs("a", 1, 1) == val_docs("b", 1, 2)  # worker count does not change the split
    assert val_docs("a2", 1, 1) != val_docs("c", 2, 1)


def test_val_tokens_takes_fewest_documents_reaching_budget(tmp_path):
    docs = make_docs(50)
    src = write_jsonl(tmp_path / "a.jsonl", docs)
    meta = prepare([str(src)], tmp_path / "out", val_tokens=1000, chunk_size=500, num_workers=1, verbose=False)
    # Expected: documents in seeded priority order until their tokens (text + EOS) reach the budget.
    order = sorted(range(50), key=lambda i: document_priority(42, "a.jsonl", i))
    expected, total = [], 0
    for i in order:
        if total >= 1000:
            break
        expected.append(docs[i])
        total += len(docs[i].encode()) + 1
    val = _documents(_all_tokens(tmp_path / "out" / "val"), load_tokenizer("byte"))
    assert sorted(val) == sorted(expected)
    assert meta["splits"]["val"]["tokens"] == total >= 1000


def test_datamodule_batches_are_shifted_blocks(corpus_dir):
    dm = TokenDataModule(data_dir=str(corpus_dir), seq_len=32, batch_size=4, num_workers=0, shuffle=False)
    dm.setup("fit")
    inputs, targets = next(iter(dm.train_dataloader()))
    assert inputs.shape == targets.shape == (4, 32) and inputs.dtype == targets.dtype == torch.long
    assert torch.equal(inputs[:, 1:], targets[:, :-1])
    # Unshuffled, the first block is the first 33 tokens of the train split.
    first = _all_tokens(corpus_dir / "train")[:33]
    assert inputs[0].tolist() == first[:-1].tolist() and targets[0].tolist() == first[1:].tolist()
    assert dm.vocab_size == 259 and dm.tokenizer_identity["name"] == "byte"


def test_no_packing_masks_targets_after_first_eos(corpus_dir):
    dm = TokenDataModule(data_dir=str(corpus_dir), seq_len=64, batch_size=8, num_workers=0, pack=False)
    dm.setup("fit")
    inputs, targets = next(iter(dm.train_dataloader()))
    for x, y in zip(inputs, targets):
        eos = (x == 256).nonzero()
        if len(eos):
            cut = int(eos[0])
            assert (y[cut:] == -100).all() and (y[:cut] != -100).all()
            assert cut == 0 or y[cut - 1] != -100
        else:
            assert (y != -100).all()


def test_validation_is_a_fixed_token_budget(corpus_dir):
    dm = TokenDataModule(data_dir=str(corpus_dir), seq_len=16, batch_size=4, num_workers=0, val_tokens=160)
    dm.setup("fit")
    first = [x for x, _ in dm.val_dataloader()]
    again = [x for x, _ in dm.val_dataloader()]
    assert sum(x.shape[0] for x in first) == 10  # 160 target tokens / 16 per sequence
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_builtin_shakespeare_prepared_on_first_use(tmp_path):
    dm = TokenDataModule(seq_len=128, batch_size=2, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    text = load_tokenizer("byte").decode(next(iter(dm.val_dataloader()))[0][0])
    assert text.isprintable() or "\n" in text
    meta = json.loads((dm.folders[0].root / "diffv2_data.json").read_text())
    assert meta["splits"]["train"]["tokens"] > 2_000_000 and meta["splits"]["val"]["documents"] >= 1
    assert str(dm.folders[0].root).startswith(str(tmp_path / "cache"))
