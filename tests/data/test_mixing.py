"""Weighted mixing: sequences come from each source in the configured proportions."""

import torch

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.data.prepare import prepare
from tests.data.conftest import write_jsonl


def _single_letter_corpus(tmp_path, letter: str, n_docs: int = 300):
    src = write_jsonl(tmp_path / f"{letter}.jsonl", [letter * 60 for _ in range(n_docs)])
    prepare([str(src)], tmp_path / letter, chunk_size=2048, val_fraction=0.1, num_workers=1, verbose=False)
    return str(tmp_path / letter)


def test_mix_proportions_within_tolerance(tmp_path):
    a, b = _single_letter_corpus(tmp_path, "a"), _single_letter_corpus(tmp_path, "b")
    # Weights 3 and 1 are normalised to 0.75 / 0.25.
    dm = TokenDataModule(mix=[{"path": a, "weight": 3}, {"path": b, "weight": 1}], seq_len=16, batch_size=8,
                         num_workers=0, val_tokens=800)
    dm.setup("fit")
    loader = dm.train_dataloader()
    from_a = total = 0
    for step, (inputs, _) in enumerate(loader):
        from_a += int(((inputs == ord("a")).any(dim=1)).sum())
        total += inputs.shape[0]
        if step == 119:
            break
    assert total == 960
    assert abs(from_a / total - 0.75) < 0.05  # ~3.5 standard deviations
    assert len(loader) >= 120  # the epoch length is known (see TrainLoader)

    # Validation takes each source's share of the fixed budget: 800 tokens -> 38 + 13 sequences.
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert (val == ord("a")).any(dim=1).sum() == 38 and (val == ord("b")).any(dim=1).sum() == 13


def test_zero_weight_source_is_never_sampled(tmp_path):
    a, b = _single_letter_corpus(tmp_path, "a", 100), _single_letter_corpus(tmp_path, "b", 100)
    dm = TokenDataModule(mix=[{"path": a, "weight": 1}, {"path": b, "weight": 0}], seq_len=16, batch_size=8,
                         num_workers=0, val_tokens=0)
    dm.setup("fit")
    batches = [x for x, _ in dm.train_dataloader()]
    assert batches and not any((x == ord("b")).any() for x in batches)
