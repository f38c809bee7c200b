"""Two-process FSDP2 run (ModelParallelStrategy on CPU, gloo) for test_fsdp.py; writes one JSON per rank.

Run as `python tests/callbacks/fsdp_run.py OUT_DIR`; Lightning relaunches this script for rank 1.
"""

import json
import os
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
from tests.callbacks.conftest import TinyLM, token_loader  # noqa: E402

from diffv2_lit.callbacks import DiffMonitor, GradientSpikeDetector  # noqa: E402


class ShardedLM(TinyLM):
    def configure_model(self) -> None:
        for block in self.model.layers:
            fully_shard(block, mesh=self.device_mesh["data_parallel"])
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def on_before_optimizer_step(self, optimizer) -> None:
        # After the detector ran: the reference norm, from the full (unsharded) gradients.
        grads = [p.grad.full_tensor() for p in self.parameters() if p.grad is not None]
        if grads:  # none after a skipped step
            norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
            self.norms.append([self.global_step, norm.item()])

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, foreach=True)


def main(out_dir: str) -> None:
    module = ShardedLM(lr=1e-3, grad_scale_at={12: 100.0})
    module.norms = []
    detector = GradientSpikeDetector(action="skip", warmup=6, method="median", window=1000, log_dir=out_dir)
    monitor = DiffMonitor(every_n_steps=5)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, max_steps=15, callbacks=[detector, monitor],
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out_dir,
    )
    trainer.fit(module, token_loader())
    rank = trainer.global_rank
    result = {"rank": rank, "count": detector.count, "last_spike_step": detector.last_spike_step,
              "stats": detector.grad_stats.state_dict(), "reference_norms": module.norms,
              "monitor_last_step": monitor._step.seen,
              "first_weight_sum": float(module.model.norm.weight.full_tensor().sum())}
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(sys.argv[1])
