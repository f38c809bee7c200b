"""Tiny models, data and a loss recorder shared by the training tests (and run_tiny.py)."""

from __future__ import annotations

import lightning as L
import torch

from diffv2_lit.training.module import DecoderLM
from diffv2_lit.data.synthetic import SyntheticDataModule

TINY_MODEL = {"preset": "quickstart", "n_layers": 2, "dim": 64, "n_heads": 2, "n_kv_heads": 1, "head_dim": 32,
              "vocab_size": 64, "max_seq_len": 64}


def tiny_module(attention: str = "diffv2", architecture: dict | None = None, **kwargs) -> DecoderLM:
    kwargs = {"lr": 3e-3, "warmup_steps": 2, **kwargs}
    return DecoderLM(architecture={**TINY_MODEL, "attention": attention, **(architecture or {})}, **kwargs)


def tiny_data(batch_size: int = 4, **kwargs) -> SyntheticDataModule:
    kwargs = {"vocab_size": 64, "seq_len": 32, "alphabet": 32, **kwargs}
    return SyntheticDataModule(batch_size=batch_size, **kwargs)


def tiny_trainer(max_steps: int, callbacks=(), **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                    num_sanity_val_steps=0, gradient_clip_val=1.0, deterministic=True)
    return L.Trainer(max_steps=max_steps, callbacks=list(callbacks), **{**defaults, **kwargs})


class LossRecorder(L.Callback):
    """Per optimizer step: the loss averaged over ranks, and a fingerprint of the batch it came from."""

    def __init__(self) -> None:
        self.losses: list[float] = []
        self.batches: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses.append(float(loss))
        self.batches.append(int(batch[0].sum()))


class ScaleGradientsAt(L.Callback):
    """Multiplies the accumulated gradients by `factor` after the last micro-batch of optimizer step `step`
    (before any `on_before_optimizer_step`): a gradient spike injected into a real run."""

    def __init__(self, step: int, factor: float) -> None:
        self.step, self.factor = step, factor

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == self.step and not trainer.fit_loop._should_accumulate():
            for p in pl_module.parameters():
                if p.grad is not None:
                    p.grad.mul_(self.factor)


class StepGradientNorms(L.Callback):
    """Per optimizer step: the global gradient norm before clipping (the module's), and the norm of the
    gradients the optimizer applied, computed here from the gradients left after `optimizer.step` (which
    reads them without changing them). Steps that GradScaler skips have no applied norm."""

    def __init__(self) -> None:
        self.before: dict[int, float] = {}
        self.applied: dict[int, float] = {}
        self._step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].register_step_post_hook(self._record)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._step = trainer.global_step
        self.before[self._step] = pl_module.step_result().grad_norm

    def _record(self, optimizer, args, kwargs) -> None:
        grads = [p.grad.float() for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.applied[self._step] = float(torch.stack([g.norm() for g in grads]).norm()) if grads else 0.0
