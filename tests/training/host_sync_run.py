"""Count host syncs and collectives per optimizer step of a quickstart-shaped run with the recipes' default
callbacks (Lightning re-launches this script once per rank).

    python tests/training/host_sync_run.py --out counts.json [--devices 2] [--action log|skip] [--accumulate 2]

A host sync is any conversion of a tensor to a Python value: `aten._local_scalar_dense` (`.item()`,
`float()`, `bool()`, `int()`), data-dependent shapes (`nonzero`), and `Tensor.tolist()` / `.numpy()`, which
dispatch no aten op on the CPU but copy to the host on a GPU. A collective is any call of a
`torch.distributed` collective from Python except FSDP's own gradient and parameter traffic
(all-gather / reduce-scatter of its buffers), which the budget leaves aside (DDP's gradient all-reduce
runs in its C++ reducer and is not seen either). A step's window runs from the end of the previous
optimizer step to the end of this one, Lightning's loop included; syncs inside the DataLoader's own
iteration are left out, because data is made on the host in a GPU run too.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from diffv2_lit.callbacks import DiffMonitor, GradientSpikeDetector, SampleText, ThroughputMFU  # noqa: E402
from diffv2_lit.callbacks.preemption import PreemptionCheckpoint  # noqa: E402
from diffv2_lit.callbacks.progress import StepProgressBar  # noqa: E402
from tests.training.helpers import tiny_data, tiny_module  # noqa: E402

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.masked_select", "aten.unique")
COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_object", "broadcast_object_list", "barrier",
               "reduce", "gather", "scatter", "all_to_all", "all_gather_into_tensor", "reduce_scatter_tensor")
FSDP_TRAFFIC = ("all_gather_into_tensor", "reduce_scatter_tensor")  # the gradient / parameter exchange itself


def _in_data_loading() -> bool:
    return any("torch/utils/data/" in frame.filename for frame in traceback.extract_stack())


def _count_sync(counts: Counter, what: str) -> None:
    if not _in_data_loading():
        counts["syncs"] += 1
        counts[f"sync:{what}"] += 1


class Counting(TorchDispatchMode):
    def __init__(self, counts: Counter) -> None:
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket) if hasattr(func, "overloadpacket") else str(func)
        if name.startswith(SYNC_OPS):
            _count_sync(self.counts, name)
        return func(*args, **(kwargs or {}))


class StepCounter:
    """Counters switched on by `Start` (first callback) and off by `Stop` (last callback)."""

    def __init__(self) -> None:
        self.current: Counter | None = None
        self.per_step: dict[int, dict] = {}
        self._mode: Counting | None = None
        self._patch()

    def _patch(self) -> None:
        counter = self
        for method in ("tolist", "numpy"):
            original = getattr(torch.Tensor, method)

            def wrapped(tensor, *args, _original=original, _method=method, **kwargs):
                if counter.current is not None:
                    _count_sync(counter.current, f"Tensor.{_method}")
                return _original(tensor, *args, **kwargs)
            setattr(torch.Tensor, method, wrapped)
        for name in COLLECTIVES:
            original = getattr(dist, name)

            def collective(*args, _original=original, _name=name, **kwargs):
                if counter.current is not None and _name not in FSDP_TRAFFIC:
                    counter.current["collectives"] += 1
                    counter.current[f"collective:{_name}"] += 1
                return _original(*args, **kwargs)
            setattr(dist, name, collective)

    def start(self) -> None:
        if self.current is None:
            self.current = Counter()
            self._mode = Counting(self.current)
            self._mode.__enter__()

    def stop(self, step: int) -> None:
        if self.current is not None:
            self._mode.__exit__(None, None, None)
            if step >= 0:
                self.per_step[step] = dict(self.current)
            self.current, self._mode = None, None


class Windows(L.Callback):
    """Last in the callback list: a step's window closes after every other callback's batch end."""

    def __init__(self, counter: StepCounter) -> None:
        self.counter = counter
        self._last = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last = trainer.global_step
        self.counter.start()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step != self._last:  # an optimizer step ended with this micro-batch
            self._last = trainer.global_step
            self.counter.stop(trainer.global_step - 1)
            self.counter.start()

    def on_train_end(self, trainer, pl_module) -> None:
        self.counter.stop(-1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--action", default="log")
    parser.add_argument("--accumulate", type=int, default=1)
    args = parser.parse_args()
    L.seed_everything(0)
    counter = StepCounter()
    # The quickstart recipe's callbacks, with intervals shrunk to fit a 12-step run: every 4th step logs
    # (trainer, throughput), DiffMonitor and SampleText fire at step 6, the rest only train.
    callbacks = [ThroughputMFU(log_every_n_steps=4), GradientSpikeDetector(action=args.action, warmup=2),
                 DiffMonitor(every_n_steps=6), SampleText(every_n_steps=6, max_new_tokens=4),
                 PreemptionCheckpoint(), StepProgressBar(), Windows(counter)]
    trainer = L.Trainer(accelerator="cpu", devices=args.devices, strategy="ddp" if args.devices > 1 else "auto",
                        max_steps=12, log_every_n_steps=4, accumulate_grad_batches=args.accumulate,
                        gradient_clip_val=1.0, callbacks=callbacks, logger=L.pytorch.loggers.CSVLogger("logs"),
                        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
                        enable_model_summary=False)
    # Fused AdamW, as on CUDA: the for-loop AdamW reads its CPU step counters with .item(), which on a GPU
    # run stay on the host and cost no device sync.
    trainer.fit(tiny_module(max_steps=12, fused_adamw=True), tiny_data(batch_size=2))
    spikes = os.path.join(trainer.log_dir, "spikes.jsonl")
    spike_steps = [json.loads(line)["step"] for line in open(spikes)] if os.path.exists(spikes) else []
    with open(f"{args.out}.rank{trainer.global_rank}", "w") as f:
        json.dump({"per_step": counter.per_step, "spike_steps": spike_steps}, f)


if __name__ == "__main__":
    main()
