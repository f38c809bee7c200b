"""`ConsistentResume`: every rank resumes the one checkpoint, and a resumed run saves next at its next step.

- `--ckpt_path last` is resolved by every process on its own, before a process group exists (each rank
  of a multi-node job runs the CLI). The choice is a function of the files (checkpoint/resume.py), so on
  a shared filesystem all ranks agree; where they do not (node-local folders, a save landing between two
  ranks' reads), resuming would mix two training states. Once the group exists, rank 0's choice is
  compared with every rank's and a disagreement stops the run, naming both.
- Lightning's `ModelCheckpoint` does not save its `_last_global_step_saved` in the checkpoint, so after a
  resume at step N (a multiple of `every_n_train_steps`) with gradient accumulation, the first
  micro-batch, still at step N, saves `step=N.ckpt` / `last.ckpt` again with the data loader one
  micro-batch ahead: a later resume from it skips those sequences. It is set to the resumed step.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from diffv2_lit.checkpoint.errors import CheckpointError


class ConsistentResume(L.Callback):
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size < 2:
            return
        mine = str(trainer.ckpt_path) if trainer.ckpt_path else None
        rank_zeros = trainer.strategy.broadcast(mine, src=0)
        if not trainer.strategy.reduce_boolean_decision(mine == rank_zeros, all=True):
            raise CheckpointError(
                f"the ranks chose different checkpoints to resume (rank 0: {rank_zeros}; rank "
                f"{trainer.global_rank}: {mine}): every node must see the same checkpoint folder (a shared "
                "filesystem), or pass --ckpt_path PATH explicitly.")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.ckpt_path:
            return
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint):
                callback._last_global_step_saved = trainer.global_step  # tests/test_private_apis.py
