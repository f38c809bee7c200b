"""A real Lightning fit with qk_norm and z_loss on (`--model.architecture.qk_norm true --model.z_loss 1e-4`)."""

import math

import lightning as L
import pytest

from tests.training.helpers import tiny_data, tiny_module, tiny_trainer


@pytest.mark.parametrize("attention", ["baseline", "diffv2"])
def test_qk_norm_and_z_loss_fit_and_learn(attention):
    L.seed_everything(0)
    module = tiny_module(attention, architecture={"qk_norm": True}, z_loss=1e-4, max_steps=8)
    trainer = tiny_trainer(max_steps=8)
    trainer.fit(module, tiny_data())
    assert module.model.layers[0].self_attn.q_norm is not None  # built in configure_model
    loss = float(trainer.callback_metrics["train/loss"])
    assert math.isfinite(loss) and loss < math.log(64)


def test_negative_z_loss_is_refused():
    with pytest.raises(ValueError, match="model.z_loss"):
        tiny_module(z_loss=-1.0)
