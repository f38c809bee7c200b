"""`model.loss_impl` is resolved once for the device, in `DecoderLM.configure_model`, and every step then runs
that implementation without asking again (issue 21.2): measured in real CPU Trainer runs."""

import lightning as L
import pytest
import torch

import diffv2_lit.model.loss as loss_module
import diffv2_lit.training.module as module_module
from diffv2_lit.errors import UsageError
from diffv2_lit.model.loss import linear_cross_entropy
from tests.training.helpers import tiny_data, tiny_module, tiny_trainer


class AskForLigerAfterConfiguring(L.Callback):
    """After the model is configured, change the requested implementation to one the CPU cannot run: a step
    that resolved `loss_impl` again would fail; one that runs the implementation chosen in configure_model
    does not notice. Counts the training batches it sees."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.hparams.loss_impl = "liger"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches += 1


def counting_resolutions(monkeypatch) -> list[tuple[str, str]]:
    """Every call of the real `resolve_loss_impl` from now on, wherever it is looked up (a measurement)."""
    calls, real = [], loss_module.resolve_loss_impl

    def resolve(requested, device):
        calls.append((requested, torch.device(device).type))
        return real(requested, device)

    monkeypatch.setattr(loss_module, "resolve_loss_impl", resolve)
    monkeypatch.setattr(module_module, "resolve_loss_impl", resolve)
    return calls


@pytest.mark.parametrize(("requested", "runs_as"), [("auto", "plain"), ("chunked", "chunked")])
def test_the_implementation_is_chosen_once_and_kept(monkeypatch, requested, runs_as):
    calls = counting_resolutions(monkeypatch)
    torch.manual_seed(0)
    module = tiny_module(loss_impl=requested)
    asking = AskForLigerAfterConfiguring()
    trainer = tiny_trainer(max_steps=3, callbacks=[asking], limit_val_batches=2, val_check_interval=2)
    trainer.fit(module, datamodule=tiny_data(val_batches=2))
    assert asking.batches == 3 and trainer.global_step == 3  # every step ran, with liger asked for after setup
    assert module.loss_impl == runs_as
    assert calls == [(requested, "cpu")]  # once, in configure_model: not per training or validation step
    assert torch.isfinite(trainer.callback_metrics["val/loss"])


def test_an_implementation_the_device_cannot_run_is_refused_before_any_batch():
    module = tiny_module(loss_impl="liger")
    asking = AskForLigerAfterConfiguring()
    trainer = tiny_trainer(max_steps=2, callbacks=[asking])
    with pytest.raises(UsageError, match=r"model\.loss_impl='liger' needs CUDA and liger-kernel"):
        trainer.fit(module, datamodule=tiny_data())
    assert asking.batches == 0


def test_the_per_call_loss_takes_only_a_resolved_implementation():
    hidden, weight, targets = torch.randn(4, 8), torch.randn(16, 8), torch.randint(0, 16, (4,))
    with pytest.raises(ValueError, match="resolve it once"):
        linear_cross_entropy(hidden, weight, targets, "auto")
    assert torch.isfinite(linear_cross_entropy(hidden, weight, targets, "plain"))
