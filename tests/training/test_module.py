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


# GPT-3's 125M shape (Brown et al. 2020, table 2.1: 12 layers, d_model 768, 12 heads of 64) with the project's
# choices written out by hand: 4 KV heads, tied embeddings, GPT-2's 50257 ids padded to 50304 (a multiple of 64),
# Llama's SwiGLU width 8/3 x 768 = 2048, a 2048-token context.
GPT3_125M_BASELINE = dict(vocab_size=50304, n_layers=12, dim=768, n_heads=12, n_kv_heads=4, head_dim=64,
                          ffn_hidden_dim=2048, max_seq_len=2048, tie_embeddings=True, attention="baseline")


def _fields(config: ModelConfig) -> dict:
    return {key: getattr(config, key) for key in GPT3_125M_BASELINE}


def test_every_form_of_a_model_spec_builds_the_shape_it_names():
    """An Architecture, its dict (a recipe's YAML), a module's `architecture=` argument and a recipe through the
    CLI parser: each builds GPT-3's 125M shape as written above, not merely the same thing as each other."""
    assert _fields(resolve_model_config(Architecture(preset="125m", attention="baseline"))) == GPT3_125M_BASELINE
    assert _fields(resolve_model_config({"preset": "125m", "attention": "baseline"})) == GPT3_125M_BASELINE
    module = DecoderLM(architecture={"preset": "125m", "attention": "baseline"})
    assert {k: module.hparams["model_config"][k] for k in GPT3_125M_BASELINE} == GPT3_125M_BASELINE
    from diffv2_lit.cli.fit import parse_config
    from tests.training.test_recipes import ROOT, _model_config

    assert _fields(_model_config(parse_config([str(ROOT / "recipes" / "125m-baseline.yaml")]))) == GPT3_125M_BASELINE
    # Forms that never reach from_preset: the shape written out (a dict without `preset`, a ModelConfig), through
    # resolve_model_config and DecoderLM, give the preset's whole config, every field (defaults included) equal.
    preset = resolve_model_config(Architecture(preset="125m", attention="baseline"))
    assert resolve_model_config(dict(GPT3_125M_BASELINE)) == preset
    written_out = ModelConfig(**GPT3_125M_BASELINE)
    assert resolve_model_config(written_out) is written_out and written_out == preset
    assert DecoderLM(architecture=written_out).hparams["model_config"] == dataclasses.asdict(preset)
    # The string form: the quickstart's 4 x 128, 4 heads of 32 over 2 KV heads, SwiGLU 8/3 x 128 -> 512 (a multiple
    # of 256), the byte tokenizer's 259 ids padded to 320.
    quickstart = resolve_model_config("quickstart")
    assert (quickstart.vocab_size, quickstart.n_layers, quickstart.dim, quickstart.n_heads, quickstart.n_kv_heads,
            quickstart.head_dim, quickstart.ffn_hidden_dim) == (320, 4, 128, 4, 2, 32, 512)


def test_fields_a_preset_derives_follow_the_overrides():
    """head_dim = dim / n_heads and the SwiGLU width 8/3 x dim (rounded up to 256) from the overridden fields."""
    wider = resolve_model_config({"preset": "125m", "dim": 1536})
    assert (wider.head_dim, wider.ffn_hidden_dim) == (1536 // 12, 4096)
    fewer_heads = resolve_model_config(Architecture(preset="125m", n_heads=8))
    assert (fewer_heads.head_dim, fewer_heads.ffn_hidden_dim) == (96, 2048)
    module = DecoderLM(architecture={"preset": "125m", "n_layers": 2})
    assert (module.hparams["model_config"]["n_layers"], module.hparams["model_config"]["dim"]) == (2, 768)


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
        module = tiny_module(parallel=kwargs)
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
