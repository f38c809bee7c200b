"""Validation through the fused loss does no gradient work (issue 19.7): in a real `Trainer.validate`, a
dispatch-level spy around each validation step sees no matmul that contracts over the vocabulary (the
logits' gradient @ weight) and no tensor of the output weight's shape (its gradient), and the loss is the
plain implementation's."""

import lightning as L
import pytest
import torch

from tests.model.test_loss import MatmulSpy
from tests.training.helpers import TINY_MODEL, tiny_data, tiny_module, tiny_trainer

VOCAB = 96  # no other dimension of the tiny model is 96 (dim 64, FFN 256, 128 tokens per batch)


class SpyOnValidationSteps(L.Callback):
    def __init__(self) -> None:
        self.spy = MatmulSpy()

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.spy.__enter__()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.spy.__exit__(None, None, None)


def _validate(loss_impl: str, **trainer_kwargs) -> tuple[float, MatmulSpy]:
    torch.manual_seed(0)
    module = tiny_module(architecture={"vocab_size": VOCAB}, loss_impl=loss_impl)
    spying = SpyOnValidationSteps()
    trainer = tiny_trainer(max_steps=1, limit_val_batches=2, callbacks=[spying], **trainer_kwargs)
    (metrics,) = trainer.validate(module, datamodule=tiny_data(val_batches=2), verbose=False)
    return metrics["val/loss"], spying.spy


@pytest.mark.parametrize("inference_mode", [True, False])
def test_validate_with_the_chunked_loss_computes_no_gradient(inference_mode):
    loss, spy = _validate("chunked", inference_mode=inference_mode)
    assert len([b for a, b in spy.matmuls if b[-1] == VOCAB]) == 2  # logits: one chunk (128 tokens) per batch
    assert not [(a, b) for a, b in spy.matmuls if a[-1] == VOCAB], "a matmul contracted over the vocabulary"
    assert (VOCAB, TINY_MODEL["dim"]) not in spy.allocated, "a tensor of the output weight's shape was allocated"
    plain_loss, _ = _validate("plain")
    assert loss == pytest.approx(plain_loss, rel=1e-6)
