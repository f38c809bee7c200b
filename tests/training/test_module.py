import dataclasses

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffv2_lit.model import ModelConfig
from diffv2_lit.model import Architecture, resolve_model_config
from diffv2_lit.training.module import DecoderLM
from diffv2_lit.checkpoint.safe_load import load_file

from tests.training.helpers import LossRecorder, tiny_data, tiny_module, tiny_trainer


def test_model_spec_forms_agree():
    from_spec = resolve_model_config(Architecture(preset="125m", attention="baseline"))
    assert from_spec == ModelConfig.from_preset("125m", attention="baseline")
    assert resolve_model_config({"preset": "125m", "attention": "baseline"}) == from_spec
    assert resolve_model_config("quickstart") == ModelConfig.from_preset("quickstart")
    module = DecoderLM(architecture={"preset": "125m", "n_layers": 2})
    assert module.hparams["model_config"]["n_layers"] == 2 and module.hparams["model_config"]["dim"] == 768


def test_refuses_a_vocabulary_larger_than_the_model():
    trainer = tiny_trainer(max_steps=1)
    with pytest.raises(ValueError, match="vocab_size=64 is smaller"):
        trainer.fit(tiny_module(), tiny_data(vocab_size=300))


def test_fit_logs_loss_grad_norm_lr_and_val():
    trainer = tiny_trainer(max_steps=4, limit_val_batches=2, val_check_interval=4, accumulate_grad_batches=2)
    module = tiny_module()
    trainer.fit(module, tiny_data())
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/grad_norm", "lr", "val/loss", "val/ppl"):
        assert key in metrics, key
    assert torch.isclose(metrics["val/ppl"], metrics["val/loss"].exp())
    assert metrics["train/grad_norm"] > 0
    assert trainer.global_step == 4


def test_resume_is_exact(tmp_path):
    """Stop at step 4, resume from the checkpoint: steps 5-8 equal an uninterrupted run's, batch for batch."""
    L.seed_everything(0)
    full = LossRecorder()
    tiny_trainer(max_steps=8, callbacks=[full]).fit(tiny_module(max_steps=8), tiny_data())

    L.seed_everything(0)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=4, save_last=True)
    first = LossRecorder()
    tiny_trainer(max_steps=4, callbacks=[first, checkpoint], enable_checkpointing=True).fit(
        tiny_module(max_steps=8), tiny_data())

    L.seed_everything(123)  # the checkpoint, not the seed, must carry the state
    resumed = LossRecorder()
    tiny_trainer(max_steps=8, callbacks=[resumed]).fit(tiny_module(max_steps=8), tiny_data(),
                                                       ckpt_path=str(tmp_path / "last.ckpt"))
    assert first.losses == full.losses[:4]
    assert resumed.batches == full.batches[4:]
    assert resumed.losses == full.losses[4:]


def test_checkpoint_holds_model_config_and_plain_keys(tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    trainer = tiny_trainer(max_steps=2, callbacks=[checkpoint], enable_checkpointing=True)
    trainer.fit(tiny_module(), tiny_data())
    saved = load_file(tmp_path / "last.ckpt")
    assert saved["hyper_parameters"]["model_config"]["attention"] == "diffv2"
    assert saved["hyper_parameters"]["tokenizer"] == "byte"
    assert "model.layers.0.self_attn.lambda_proj.weight" in saved["state_dict"]
    restored = DecoderLM.load_from_checkpoint(tmp_path / "last.ckpt")
    assert restored.model_config == trainer.lightning_module.model_config


def test_activation_checkpointing_and_compile_keep_the_losses():
    """parallelize's AC (every block / every 2nd) and per-block torch.compile change speed and memory, not math."""
    runs = {}
    for name, kwargs in {"plain": {}, "ac": {"activation_checkpointing": True},
                         "ac2+compile": {"activation_checkpointing": 2, "compile": True}}.items():
        L.seed_everything(0)
        recorder = LossRecorder()
        module = tiny_module(**kwargs)
        tiny_trainer(max_steps=2, callbacks=[recorder]).fit(module, tiny_data())
        runs[name] = recorder.losses
        # names stay the plain model's, so checkpoints and optimizer groups do not change
        assert "model.layers.0.self_attn.q_proj.weight" in module.state_dict()
    torch.testing.assert_close(runs["ac"], runs["plain"], rtol=0, atol=0)
    torch.testing.assert_close(runs["ac2+compile"], runs["plain"], rtol=1e-5, atol=1e-5)


def test_a_model_config_from_python_is_stored_as_a_plain_dict():
    config = ModelConfig(n_layers=1, dim=64, n_heads=2, n_kv_heads=1, head_dim=32)
    module = DecoderLM(architecture=config)
    assert module.model_config == config and module.hparams["architecture"] == dataclasses.asdict(config)


@pytest.mark.parametrize("tie", [False, True])
def test_chunked_loss_trains_like_the_plain_loss(tie):
    """Six optimizer steps with the fused chunked loss give the plain loss's losses, gradient norms and
    weights (fp32), with untied and tied embeddings."""
    results = {}
    for impl in ("plain", "chunked"):
        L.seed_everything(0)
        recorder = LossRecorder()
        trainer = tiny_trainer(max_steps=6, callbacks=[recorder], limit_val_batches=2, val_check_interval=6)
        module = tiny_module(loss_impl=impl, architecture={"tie_embeddings": tie})
        trainer.fit(module, tiny_data())
        results[impl] = (recorder.losses, module.model.state_dict(), trainer.callback_metrics)
    (plain_losses, plain_weights, plain_metrics), (losses, weights, metrics) = results["plain"], results["chunked"]
    torch.testing.assert_close(losses, plain_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(metrics["val/loss"], plain_metrics["val/loss"], rtol=1e-5, atol=1e-6)
    for key, value in plain_weights.items():
        torch.testing.assert_close(weights[key], value, rtol=1e-4, atol=1e-5)  # Adam magnifies 1e-7 gradient noise
