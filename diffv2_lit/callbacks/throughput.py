"""`ThroughputMFU`: tokens/s, MFU and peak memory, logged every N optimizer steps.

FLOPs per token come from `diffv2_lit.model.flops.training_flops_per_token` (PaLM convention:
6 per matmul parameter plus the attention core, DIFF V2's doubled query heads included).

MFU = achieved FLOP/s per device / dense peak FLOP/s of the device. Lightning's ThroughputMonitor
has no dense entry for "NVIDIA H200" (and a sparse one for H100/H200), hence this table.
Uses the module protocol (callbacks/protocol.py): `pl_module.model_config`.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch

from diffv2_lit.callbacks.protocol import OncePerStep, log_metrics
from diffv2_lit.model.flops import training_flops_per_token


# Dense bf16 peak FLOP/s (no 2:4 sparsity), per device.
PEAK_FLOPS_BF16: dict[str, float] = {
    "A100": 312e12,
    "H100": 989e12,  # SXM; the PCIe card is 756e12 (pass peak_flops to override)
    "H200": 989e12,
    "B200": 2250e12,
}


def device_peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak for a known CUDA device name, else None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_FLOPS_BF16.items():
        if key in name:
            return peak
    return None


class ThroughputMFU(L.Callback):
    """Logs tokens/s per device and in total, MFU, and peak memory every `log_every_n_steps` optimizer steps.

    peak_flops: dense peak FLOP/s per device; None looks the GPU up in PEAK_FLOPS_BF16 (no MFU on
    CPU unless given).
    """

    def __init__(self, log_every_n_steps: int = 10, peak_flops: float | None = None) -> None:
        if log_every_n_steps < 1:
            raise ValueError(f"log_every_n_steps={log_every_n_steps} must be >= 1.")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops={peak_flops} must be positive (FLOP/s, e.g. 989e12).")
        self.log_every_n_steps = log_every_n_steps
        self.peak_flops = peak_flops
        self._tokens = 0
        self._batch_tokens = 0
        self._start: float | None = None
        self._flops_per_token: float | None = None
        self._step = OncePerStep()
        self.last_metrics: dict[str, float] = {}  # the newest values logged (the progress bar shows tokens/s)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_flops = self.peak_flops or device_peak_flops(pl_module.device)
        self._step.seen = trainer.global_step
        self._restart_window()

    def _restart_window(self) -> None:
        # No device synchronisation: the module reads its step statistics on the host once per step, so the
        # host never runs more than about one optimizer step ahead of the device, and a window of many steps
        # is timed to within that step at either end.
        self._tokens, self._start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        input_ids = batch[0]
        self._tokens += input_ids.numel()
        self._batch_tokens = input_ids.numel()
        if self._flops_per_token is None:
            self._flops_per_token = training_flops_per_token(pl_module.model_config, input_ids.shape[1])
        if self._step.first(trainer.global_step) and trainer.global_step % self.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        elapsed = time.perf_counter() - self._start
        per_device = self._tokens / max(elapsed, 1e-9)
        # Tokens seen so far by all ranks (the x-axis `diffv2-lit compare` plots losses against).
        tokens_per_step = self._batch_tokens * trainer.accumulate_grad_batches * trainer.world_size
        metrics = {"perf/tokens_per_sec_per_device": per_device,
                   "perf/tokens_per_sec": per_device * trainer.world_size,
                   "perf/tokens_seen": float(trainer.global_step * tokens_per_step),
                   "perf/peak_memory_gb": peak_memory_bytes(pl_module.device) / 1e9}
        if self.peak_flops:
            metrics["perf/mfu"] = per_device * self._flops_per_token / self.peak_flops
        log_metrics(trainer, metrics, trainer.global_step - 1)  # the index of the step just taken, as train/loss
        self.last_metrics = metrics
        self._restart_window()

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart_window()  # do not count validation time as training time


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB

