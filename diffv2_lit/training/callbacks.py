"""Training callbacks: throughput / MFU, and generated sample text.

FLOPs per token come from `diffv2_lit.model.flops.training_flops_per_token` (PaLM convention:
6 per matmul parameter plus the attention core, DIFF V2's doubled query heads included).

MFU = achieved FLOP/s per device / dense peak FLOP/s of the device. Lightning's ThroughputMonitor
has no dense entry for "NVIDIA H200" (and a sparse one for H100/H200), hence this table.
"""

from __future__ import annotations

import resource
import sys
import time

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from diffv2_lit.callbacks.model_access import decode_mode, model_call
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
        self._last_step = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.peak_flops = self.peak_flops or device_peak_flops(pl_module.device)
        self._last_step = trainer.global_step
        self._restart_window(pl_module.device)

    def _restart_window(self, device: torch.device) -> None:
        _synchronize(device)
        self._tokens, self._start = 0, time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        input_ids = batch[0]
        self._tokens += input_ids.numel()
        self._batch_tokens = input_ids.numel()
        if self._flops_per_token is None:
            self._flops_per_token = training_flops_per_token(pl_module.model_config, input_ids.shape[1])
        if _new_optimizer_step(self, trainer) and trainer.global_step % self.log_every_n_steps == 0:
            self._log(trainer, pl_module)

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _synchronize(pl_module.device)
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
        pl_module.log_dict(metrics, on_step=True, on_epoch=False)
        self._restart_window(pl_module.device)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._restart_window(pl_module.device)  # do not count validation time as training time


def _new_optimizer_step(callback: L.Callback, trainer: L.Trainer) -> bool:
    """True on the first batch end after an optimizer step (not after every accumulated micro-batch)."""
    if trainer.global_step == callback._last_step:
        return False
    callback._last_step = trainer.global_step
    return True


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def decode_tokens(ids: list[int], tokenizer: str | None) -> str:
    """Token ids -> text: the data's tokenizer if it can be loaded, else the byte tokenizer (ids < 256)."""
    if tokenizer and tokenizer != "byte":
        try:
            from diffv2_lit.data.tokenizer import load_tokenizer

            return load_tokenizer(tokenizer).decode(ids)
        except Exception:
            pass
    return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def encode_prompt(prompt: str, tokenizer: str | None) -> list[int]:
    if tokenizer and tokenizer != "byte":
        try:
            from diffv2_lit.data.tokenizer import load_tokenizer

            return load_tokenizer(tokenizer).encode(prompt)
        except Exception:
            pass
    return list(prompt.encode("utf-8"))


class SampleText(L.Callback):
    """Every `every_n_steps` optimizer steps, generate text (KV-cache `generate`) and log it to
    TensorBoard under `samples/text`; with `print_at_end`, also print one sample when fit ends.

    All ranks generate (under FSDP every forward needs every rank); only rank 0 logs and prints.
    Sampling uses its own seeded generator so it never disturbs the training RNG streams.
    """

    def __init__(self, every_n_steps: int = 500, prompt: str = "\n", max_new_tokens: int = 200,
                 temperature: float = 0.8, top_k: int | None = 50, seed: int = 1234,
                 print_at_end: bool = False) -> None:
        if every_n_steps < 1 or max_new_tokens < 1:
            raise ValueError("every_n_steps and max_new_tokens must be >= 1.")
        if not prompt:
            raise ValueError("prompt must not be empty (the model needs at least one token to start from).")
        self.every_n_steps, self.prompt, self.max_new_tokens = every_n_steps, prompt, max_new_tokens
        self.temperature, self.top_k, self.seed, self.print_at_end = temperature, top_k, seed, print_at_end
        self._last_step = -1
        self._decode: str | None = None  # None: choose per run (decode_mode); "eager" after a failed capture

    def sample(self, pl_module: L.LightningModule, trainer: L.Trainer | None = None) -> str:
        tokenizer = pl_module.hparams.get("tokenizer", "byte")
        prompt_ids = torch.tensor([encode_prompt(self.prompt, tokenizer)], device=pl_module.device)
        new_tokens = max(1, min(self.max_new_tokens, pl_module.model_config.max_seq_len - prompt_ids.shape[1]))
        was_training = pl_module.training
        pl_module.eval()
        # No autocast needed: the KV cache takes the dtype the model computes in (bf16 under FSDP2's
        # MixedPrecisionPolicy, fp32 with fp32 weights), so queries and cached keys always agree.
        try:
            out = self._generate(pl_module, trainer, prompt_ids, new_tokens)
        finally:
            pl_module.train(was_training)
        return decode_tokens(out[0].tolist(), tokenizer)

    def _generate(self, pl_module: L.LightningModule, trainer: L.Trainer | None, prompt_ids, new_tokens: int):
        """A captured decode step where it can be (one unsharded CUDA model), else eager. A sample is a
        side show: if capturing fails, say so once and decode eagerly from then on, but keep training."""
        decode = self._decode or (decode_mode(trainer, pl_module) if trainer is not None else "eager")
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        kwargs = dict(temperature=self.temperature, top_k=self.top_k, generator=generator,
                      forward=model_call(trainer, pl_module))
        try:
            return pl_module.model.generate(prompt_ids, new_tokens, decode=decode, **kwargs)
        except Exception as err:
            if decode == "eager":
                raise
            rank_zero_warn(f"SampleText: decoding with decode={decode!r} failed ({type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}); decoding eagerly from now on.")
            self._decode = "eager"
            generator.manual_seed(self.seed)
            return pl_module.model.generate(prompt_ids, new_tokens, decode="eager", **kwargs)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not _new_optimizer_step(self, trainer) or trainer.global_step % self.every_n_steps:
            return
        text = self.sample(pl_module, trainer)
        self._log_text(trainer, text)

    @rank_zero_only
    def _log_text(self, trainer: L.Trainer, text: str) -> None:
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                # Markdown in TensorBoard: indent by four spaces so newlines and spacing survive.
                logger.experiment.add_text("samples/text", "    " + text.replace("\n", "\n    "),
                                           trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if not self.print_at_end:
            return
        text = self.sample(pl_module, trainer)
        if trainer.is_global_zero:
            print(f"\n---- sample after {trainer.global_step} steps (prompt {self.prompt!r}) ----\n{text}\n----")
