"""Measure the bytes a real FSDP2 run holds, per rank (Lightning re-launches this script once per rank).

    python tests/training/memory_run.py --devices 2 --accumulate 2 --out memory.json

Bytes are the tensors' own storages (`untyped_storage().nbytes()`, each storage counted once), local shards
only: the parameters, their gradients and AdamW's state as the module and optimizer hold them, and every
other live tensor found by the garbage collector. The accumulated unsharded gradients are what the other
tensors grow by over the first micro-batch of a step (its backward, before any reduce-scatter): step 1
accumulates without syncing (the default), step 2 reduce-scatters after every micro-batch.
FSDP2 computes in bf16 and reduces in fp32, as the GPU recipes do. Writes one JSON per rank: OUT.rank<r>.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from tests.training.helpers import tiny_data, tiny_module, tiny_trainer  # noqa: E402

# Odd row counts (vocab 100, FFN 200 on 2 ranks is even; 3 KV heads x 32 = 96 rows) and a width that makes
# the parameters a few MB, so that a missing or double-counted term shows.
ARCHITECTURE = {"n_layers": 3, "dim": 96, "n_heads": 3, "n_kv_heads": 3, "head_dim": 32, "vocab_size": 101,
                "ffn_hidden_dim": 200, "max_seq_len": 64}
SEQ_LEN = 32


def _storage_key(tensor: torch.Tensor):
    storage = tensor.untyped_storage()
    return (str(storage.device), storage.data_ptr()), storage.nbytes()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _bytes(tensors) -> dict:
    found = {}
    for tensor in tensors:
        if tensor is None or tensor.device.type == "meta":
            continue
        key, nbytes = _storage_key(_local(tensor))
        if nbytes:
            found[key] = nbytes
    return found


def live_tensor_bytes() -> dict:
    """Every storage of every live tensor the garbage collector sees (DTensors through their local tensor)."""
    gc.collect()
    tensors = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and not isinstance(obj, DTensor):
                tensors.append(obj)
        except Exception:  # objects whose isinstance check itself fails (lazy proxies)
            continue
    return _bytes(tensors)


class MemoryProbe(L.Callback):
    """Step 1 runs as configured (no-sync accumulation); step 2 reduce-scatters after every micro-batch
    (`fsdp_sync_every_micro_batch: true`, switched on before DecoderLM's own hook reads it)."""

    def __init__(self, accumulate: int) -> None:
        self.accumulate = accumulate
        self.record: dict = {}

    def _held(self, trainer, pl_module) -> dict:
        params = _bytes(pl_module.parameters())
        grads = _bytes(p.grad for p in pl_module.parameters())
        optimizer = _bytes(v for state in trainer.optimizers[0].state.values() for v in state.values()
                           if isinstance(v, torch.Tensor))
        live = live_tensor_bytes()
        known = {**params, **grads, **optimizer}
        other = {k: v for k, v in live.items() if k not in known}
        return {"parameters": sum(params.values()), "gradients": sum(grads.values()),
                "optimizer": sum(optimizer.values()), "optimizer_tensors": len(optimizer),
                "other": sum(other.values()), "live": sum(live.values())}

    def _mode(self, trainer) -> str | None:
        return {1: "no_sync", 2: "sync"}.get(trainer.global_step)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        mode = self._mode(trainer)
        if mode and batch_idx % self.accumulate == 0:  # the step's first micro-batch
            pl_module.parallel = dataclasses.replace(pl_module.parallel, fsdp_sync_every_micro_batch=mode == "sync")
            self.record[mode] = {"step_start": self._held(trainer, pl_module)}

    def on_after_backward(self, trainer, pl_module) -> None:
        mode = self._mode(trainer)
        if mode and "first_backward" not in self.record[mode]:
            self.record[mode]["first_backward"] = self._held(trainer, pl_module)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        mode = self._mode(trainer)
        if mode:
            self.record[mode]["before_optimizer_step"] = self._held(trainer, pl_module)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accumulate", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    L.seed_everything(0)
    probe = MemoryProbe(args.accumulate)
    trainer = tiny_trainer(max_steps=3, callbacks=[probe], devices=args.devices, accumulate_grad_batches=args.accumulate,
                           strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1))
    module = tiny_module(architecture=ARCHITECTURE, max_steps=4, parallel={"fsdp_param_dtype": "bfloat16",
                                                                                      "fsdp_reduce_dtype": "float32"})
    trainer.fit(module, tiny_data(batch_size=2, vocab_size=ARCHITECTURE["vocab_size"], seq_len=SEQ_LEN))
    with open(f"{args.out}.rank{trainer.global_rank}", "w") as f:
        json.dump(probe.record, f)


if __name__ == "__main__":
    main()
