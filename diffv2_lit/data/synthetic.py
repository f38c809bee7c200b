"""A synthetic token LightningDataModule for tests, benchmarks and FSDP checks (no files, no tokenizer).

Every sample is a deterministic function of (seed, split, sample index): a random arithmetic
progression modulo a small alphabet, so a tiny model can learn it and losses go down. Batches have
the shape TokenDataModule produces: `(input_ids, targets)`, both LongTensor [B, seq_len], with
targets = inputs shifted by one.

The training loader is sized (so Lightning does not prefetch a batch ahead) and stateful: its
`state_dict()` is the number of batches it has handed out, which Lightning stores in the checkpoint
and gives back on resume, so a resumed run sees exactly the batch an uninterrupted run would.
"""

from __future__ import annotations

from collections.abc import Iterator

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from diffv2_lit.data.errors import DataSettingError


def synthetic_sequence(seed: int, index: int, length: int, alphabet: int) -> Tensor:
    """One deterministic token sequence [length]: start + stride * t (mod alphabet)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    start, stride = torch.randint(0, alphabet, (2,), generator=generator).tolist()
    return (start + (stride % 7 + 1) * torch.arange(length)) % alphabet


class _SyntheticStream(IterableDataset):
    """Samples `rank, rank + world, ...` of one split, starting after `start_batch` batches."""

    def __init__(self, seed: int, seq_len: int, alphabet: int, batch_size: int, n_batches: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.seed, self.seq_len, self.alphabet = seed, seq_len, alphabet
        self.batch_size, self.n_batches = batch_size, n_batches
        self.rank, self.world_size = rank, world_size
        self.start_batch = 0

    def __len__(self) -> int:
        return self.n_batches - self.start_batch

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in range(self.start_batch, self.n_batches):
            yield self._batch(batch)

    def _batch(self, batch: int) -> tuple[Tensor, Tensor]:
        first = (batch * self.world_size + self.rank) * self.batch_size
        rows = [synthetic_sequence(self.seed, first + i, self.seq_len + 1, self.alphabet)
                for i in range(self.batch_size)]
        tokens = torch.stack(rows)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


class _ResumableLoader(DataLoader):
    """DataLoader over whole batches that counts what it handed out (Lightning's `_Stateful` protocol)."""

    def __init__(self, stream: _SyntheticStream) -> None:
        super().__init__(stream, batch_size=None)
        self.stream = stream
        self.batches_served = 0

    def __iter__(self):
        for batch in super().__iter__():
            self.batches_served += 1
            yield batch
        # an epoch ended: the next one starts from the beginning again
        self.stream.start_batch, self.batches_served = 0, 0

    def __len__(self) -> int:
        return len(self.stream)

    def state_dict(self) -> dict:
        return {"batches_served": self.batches_served}

    def load_state_dict(self, state: dict) -> None:
        self.batches_served = state["batches_served"]
        self.stream.start_batch = self.batches_served


class SyntheticDataModule(L.LightningDataModule):
    """Deterministic patterned tokens. `vocab_size` is what the model must cover; tokens use the
    first `alphabet` ids (default: all of them)."""

    def __init__(self, vocab_size: int = 320, seq_len: int = 64, batch_size: int = 4, seed: int = 0,
                 train_batches: int = 100_000, val_batches: int = 2, alphabet: int | None = None,
                 tokenizer: str = "byte") -> None:
        super().__init__()
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("train_batches", train_batches)):
            if value < 1:
                raise DataSettingError(f"data.{name} must be >= 1, got {value}")
        if alphabet is not None and not 1 < alphabet <= vocab_size:
            raise DataSettingError(f"alphabet={alphabet} must be in [2, vocab_size={vocab_size}].")
        self.vocab_size = vocab_size
        self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
        self.train_batches, self.val_batches = train_batches, val_batches
        self.alphabet = alphabet or vocab_size
        self.tokenizer = tokenizer
        self._train_loader: _ResumableLoader | None = None

    def _stream(self, seed: int, n_batches: int) -> _SyntheticStream:
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        return _SyntheticStream(seed, self.seq_len, self.alphabet, self.batch_size, n_batches, rank, world)

    def train_dataloader(self) -> _ResumableLoader:
        # Keep one loader: Lightning loads the checkpointed position into it before iterating.
        if self._train_loader is None:
            self._train_loader = _ResumableLoader(self._stream(self.seed, self.train_batches))
        return self._train_loader

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._stream(self.seed + 1, self.val_batches), batch_size=None)
