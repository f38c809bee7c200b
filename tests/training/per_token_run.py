"""One optimizer step of a tiny DecoderLM on fixed rows with uneven counts of counted targets, saving the
initial weights and the gradient the optimizer applies (Lightning re-launches this script once per rank).

    python tests/training/per_token_run.py --out grads.pt [--devices 2 --strategy ddp|fsdp2] [--accumulate 2]

Rows are given to ranks by Lightning's DistributedSampler (rank r gets rows r, r + world, ...), in
micro-batches of one row; the test computes the gradient of the merged batch itself.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from tests.training.helpers import tiny_module, tiny_trainer  # noqa: E402

ROWS, SEQ, VOCAB = 4, 16, 64
COUNTED = (16, 3, 9, 1)  # counted targets per row; the rest are ignored (-100)


def rows() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inputs = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    targets = torch.randint(0, VOCAB, (ROWS, SEQ), generator=g)
    for row, counted in enumerate(COUNTED):
        targets[row, counted:] = -100
    return inputs, targets


class AppliedGradients(L.Callback):
    """The initial full weights, and the full gradients the optimizer gets at the first step (no clipping, no
    spike detector: what the module's step statistics leave in `.grad` is what AdamW applies)."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        self.initial = _full_state(pl_module.model)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        result = pl_module.step_result()  # callbacks run before the module's hook: the same result, computed here
        grads = {name: _full(p.grad) for name, p in pl_module.model.named_parameters() if p.grad is not None}
        if trainer.is_global_zero:
            torch.save({"initial": self.initial, "grads": grads, "loss": result.loss, "tokens": result.tokens},
                       self.out)


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return (tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor).detach().clone()


def _full_state(model) -> dict:
    return {name: _full(value) for name, value in model.state_dict().items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", choices=["auto", "ddp", "fsdp2"], default="auto")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    L.seed_everything(0)
    strategy = args.strategy
    if strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    trainer = tiny_trainer(max_steps=1, callbacks=[AppliedGradients(args.out)], devices=args.devices,
                           strategy=strategy, accumulate_grad_batches=args.accumulate, gradient_clip_val=None)
    module = tiny_module(architecture={"max_seq_len": SEQ}, parallel={"fsdp_param_dtype": None, "fsdp_reduce_dtype": None},
                         max_steps=10)
    trainer.fit(module, DataLoader(TensorDataset(*rows()), batch_size=1, shuffle=False))


if __name__ == "__main__":
    main()
