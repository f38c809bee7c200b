"""Per-rank sharding under DDP (2 CPU processes, gloo): ranks see different, equally many batches."""

import lightning as L
import pytest
import torch

from diffv2_lit.data.datamodule import TokenDataModule
from tests.data.test_resume import BatchRecorder


class SavingRecorder(BatchRecorder):
    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = out_dir

    def on_train_end(self):
        torch.save(self.seen, self.out_dir / f"rank{self.global_rank}.pt")


@pytest.mark.slow
def test_ddp_ranks_get_disjoint_shards(corpus_dir, tmp_path):
    dm = TokenDataModule(data_dir=str(corpus_dir), seq_len=32, batch_size=4, num_workers=0, val_tokens=0)
    # ddp_spawn, not ddp_fork: forking a process whose autograd engine has run (an earlier test in the same
    # pytest worker) is unsafe ("Unable to handle autograd's threading in combination with fork").
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(SavingRecorder(tmp_path), datamodule=dm)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(rank0) == len(rank1) == 3
    rows0 = {tuple(row.tolist()) for batch in rank0 for row in batch}
    rows1 = {tuple(row.tolist()) for batch in rank1 for row in batch}
    assert len(rows0) == len(rows1) == 12 and not rows0 & rows1
