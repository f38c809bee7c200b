"""A tiny real LightningModule around `Transformer` and a deterministic in-memory token loader.

It follows DecoderLM's contract (issue 4): `self.model` is the Transformer, `training_step` returns
the fp32 loss and logs `train/loss`. Two test-only knobs inject trouble at a chosen optimizer step:
`grad_scale_at = {step: factor}` multiplies the accumulated gradients (in `on_after_backward` of the
window's last micro-batch, i.e. before any callback's `on_before_optimizer_step`), and `nan_loss_at`
makes that step's loss NaN.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from diffv2_lit.model import ModelConfig, Transformer

torch.set_num_threads(1)  # the CI machine has 2 cores shared by several jobs

VOCAB, SEQ = 32, 16


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, n_layers=2, dim=32, n_heads=2, n_kv_heads=1, head_dim=16, ffn_hidden_dim=64,
                max_seq_len=64, attention="diffv2", attn_backend="sdpa")
    return ModelConfig(**{**base, **overrides})


def token_loader(n_rows: int = 64, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """Learnable sequences: arithmetic progressions mod VOCAB with a random start and stride."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n_rows, 1), generator=g)
    stride = torch.randint(1, 4, (n_rows, 1), generator=g)
    rows = (start + stride * torch.arange(SEQ + 1)) % VOCAB
    return DataLoader(TensorDataset(rows[:, :-1], rows[:, 1:]), batch_size=batch_size, shuffle=False)


class TinyLM(L.LightningModule):
    def __init__(self, config: ModelConfig | None = None, lr: float = 3e-3, optimizer_kwargs: dict | None = None,
                 grad_scale_at: dict[int, float] | None = None, nan_loss_at: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = Transformer(config or tiny_config())
        self.model.init_weights()
        self.lr, self.optimizer_kwargs = lr, optimizer_kwargs or {}
        self.grad_scale_at, self.nan_loss_at = grad_scale_at or {}, nan_loss_at
        self.weights_before_step: dict[int, dict] = {}  # step -> model state before that optimizer step
        self.snapshot_steps: set[int] = set()

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        self._batch_idx = batch_idx
        logits = self.model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        if self.global_step == self.nan_loss_at:
            loss = loss * float("nan")
        self.log("train/loss", loss)
        return loss

    def on_after_backward(self) -> None:
        factor = self.grad_scale_at.get(self.global_step)
        last_micro_batch = (self._batch_idx + 1) % self.trainer.accumulate_grad_batches == 0
        if factor is not None and last_micro_batch:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(factor)

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step in self.snapshot_steps:
            self.weights_before_step[self.global_step] = clone_state(self)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.1, **self.optimizer_kwargs)


def clone_state(module: L.LightningModule) -> dict:
    """Weights and optimizer state, deep-copied."""
    optimizer = module.trainer.optimizers[0]
    state = {"weights": {k: v.detach().clone() for k, v in module.state_dict().items()}}
    if optimizer is not None:
        state["optimizer"] = {i: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                              for i, s in enumerate(optimizer.state.values())}
    return state


def fast_trainer(tmp_path, callbacks, max_steps: int, logger=None, **kwargs) -> L.Trainer:
    return L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=max_steps, callbacks=callbacks,
        logger=logger if logger is not None else False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0, log_every_n_steps=1,
        **kwargs,
    )


@pytest.fixture
def tiny_loader() -> DataLoader:
    return token_loader()
