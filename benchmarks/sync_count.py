"""`CountHostSyncs`: host syncs per optimizer step of a real `diffv2-lit fit`, for the GPU suite (issue 20).

    --trainer.callbacks+=benchmarks.sync_count.CountHostSyncs --trainer.callbacks.out=syncs.json

On CUDA it switches on `torch.cuda.set_sync_debug_mode("warn")` after `skip` optimizer steps (compilation and
warm-up) and counts the warnings each later step raises: every one is a point where the host waited for the
GPU. On the CPU (the suite's --dry run) it counts `aten._local_scalar_dense` dispatches instead, what
tests/training/test_host_syncs.py budgets. Rank 0 writes {"device", "per_step": {step: syncs}} to `out`.
"""

from __future__ import annotations

import json
import warnings

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _CountScalarReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(getattr(func, "overloadpacket", func)) == "aten._local_scalar_dense":
            self.count += 1
        return func(*args, **(kwargs or {}))


class CountHostSyncs(L.Callback):
    def __init__(self, out: str, skip: int = 3) -> None:
        self.out, self.skip = out, skip
        self.per_step: dict[int, int] = {}
        self._last = -1
        self._window = None  # (kind, recorder)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self._last:
            return  # inside gradient accumulation
        self._last = trainer.global_step
        if self._window is not None:
            self.per_step[trainer.global_step - 1] = self._close()
        if trainer.global_step >= self.skip:
            self._open(pl_module.device)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._window is not None:
            self._close()  # a partial window: not counted
        if trainer.is_global_zero:
            with open(self.out, "w") as f:
                json.dump({"device": str(pl_module.device), "per_step": self.per_step}, f)

    def _open(self, device: torch.device) -> None:
        if device.type == "cuda":
            catcher = warnings.catch_warnings(record=True)
            recorded = catcher.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            self._window = ("cuda", (catcher, recorded))
        else:
            mode = _CountScalarReads()
            mode.__enter__()
            self._window = ("cpu", mode)

    def _close(self) -> int:
        kind, recorder = self._window
        self._window = None
        if kind == "cuda":
            torch.cuda.set_sync_debug_mode("default")
            catcher, recorded = recorder
            catcher.__exit__(None, None, None)
            return sum("synchroniz" in str(w.message) for w in recorded)
        recorder.__exit__(None, None, None)
        return recorder.count
