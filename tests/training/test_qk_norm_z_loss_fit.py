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


def test_the_cli_flags_as_written(tmp_path):
    """`diffv2-lit fit ... --model.architecture.qk_norm true --model.z_loss 1e-4`: the run trains, and the
    checkpoint carries the norms and the setting (what `validate`/`export` read back)."""
    import torch

    from tests.faults.helpers import fit, run_dir

    result = fit(tmp_path, "--model.architecture.qk_norm", "true", "--model.z_loss", "1e-4", "--trainer.max_steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["z_loss"] == 1e-4
    assert any(key.endswith("self_attn.q_norm.weight") for key in checkpoint["state_dict"])
