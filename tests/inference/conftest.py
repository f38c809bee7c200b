"""Tiny real checkpoints on disk, written in the layouts training produces."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffv2_lit.model import ModelConfig, Transformer

VOCAB = 300  # > 259 byte-tokenizer ids, like the quickstart's padded vocabulary


def tiny_config(attention: str = "diffv2", **overrides) -> ModelConfig:
    fields = dict(vocab_size=VOCAB, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden_dim=96,
                  max_seq_len=64, attention=attention)
    return ModelConfig(**{**fields, **overrides})


def tiny_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights()
    for name, param in model.named_parameters():  # move lambda / norm weights off their init values
        if "lambda" in name or "norm" in name or "subln" in name:
            param.data.add_(0.3 * torch.randn_like(param))
    return model.eval()


def lightning_checkpoint(model: Transformer, tokenizer: str | None = "byte", seq_len: int | None = None) -> dict:
    """The dict a Lightning .ckpt holds for DecoderLM: `model.`-prefixed weights, `model_config` hparams,
    and with `seq_len` the hyper-parameters TokenDataModule saves (Lightning stores them beside the module's)."""
    hparams = {"model_config": dataclasses.asdict(model.config)}
    if tokenizer is not None:
        hparams["tokenizer"] = tokenizer
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hparams,
                  "epoch": 0, "global_step": 1, "pytorch-lightning_version": "2.6.6"}
    if seq_len is not None:
        checkpoint["datamodule_hparams_name"] = "kwargs"
        checkpoint["datamodule_hyper_parameters"] = {"data_dir": "builtin:shakespeare", "seq_len": seq_len,
                                                     "batch_size": 16, "tokenizer": tokenizer}
    return checkpoint


@pytest.fixture
def make_checkpoint(tmp_path):
    """make_checkpoint(attention, tokenizer="byte", seq_len=None, **config overrides) -> (ckpt path, model);
    seq_len: the training sequence length the checkpoint records (None: not recorded)."""

    def make(attention: str = "diffv2", tokenizer: str | None = "byte", seq_len: int | None = None, **overrides):
        model = tiny_model(tiny_config(attention, **overrides))
        path = tmp_path / f"{attention}-{len(list(tmp_path.iterdir()))}.ckpt"
        torch.save(lightning_checkpoint(model, tokenizer, seq_len), path)
        return path, model

    return make
