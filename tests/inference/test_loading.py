"""load_for_inference / load_state_dict_for_training on real files: .ckpt, DCP directory, errors."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp

from diffv2_lit.checkpoint.reading import CheckpointError, load_for_inference, load_state_dict_for_training
from diffv2_lit.checkpoint.layout import write_complete_marker
from tests.inference.conftest import lightning_checkpoint, tiny_config, tiny_model


def _logits(model, seed: int = 1) -> torch.Tensor:
    tokens = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_lightning_file_round_trip(make_checkpoint, attention):
    path, model = make_checkpoint(attention)
    loaded, config, spec, _ = load_for_inference(path)
    assert config == model.config and spec == "byte" and not loaded.training
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_dtype_and_the_names_a_parallelized_model_saves(tmp_path):
    """Activation checkpointing and compile as training applies them (training/parallel.py: the wrapper, then
    `compile()` in place) leave the state dict's names as the plain model's: the checkpoint loads as it is."""
    from diffv2_lit.training.parallel import parallelize

    model = tiny_model(tiny_config("diffv2", tie_embeddings=True))
    plain_names, reference = list(model.state_dict()), _logits(model)
    parallelize(model, device_mesh=None, activation_checkpointing=True, compile=True)
    checkpoint = lightning_checkpoint(model)
    assert [key.removeprefix("model.") for key in checkpoint["state_dict"]] == plain_names
    checkpoint["state_dict"]["train_metric.count"] = torch.zeros(())  # non-model entries are ignored
    torch.save(checkpoint, tmp_path / "wrapped.ckpt")
    loaded, _, _, _ = load_for_inference(tmp_path / "wrapped.ckpt", dtype=torch.bfloat16)
    assert loaded.embed_tokens.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(loaded.float()), reference, rtol=0, atol=2e-2)  # bf16 rounding


def test_dcp_directory(tmp_path):
    """A sharded checkpoint as Lightning's ModelParallelStrategy writes it, saved here in one process."""
    model = tiny_model(tiny_config("diffv2"))
    checkpoint = lightning_checkpoint(model)
    optimizer_state = {"state": {"step": torch.tensor(3.0)}}
    folder = tmp_path / "epoch=0-step=1.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"state_dict": checkpoint.pop("state_dict"), "optimizer_0": optimizer_state},
                 checkpoint_id=str(folder), no_dist=True)
    torch.save(checkpoint, folder / "meta.pt")  # the rest of the checkpoint, hyper-parameters included
    write_complete_marker(folder, global_step=1)  # as diffv2-lit's save does once every rank wrote
    loaded, config, spec, _ = load_for_inference(folder)
    assert config == model.config and spec == "byte"
    torch.testing.assert_close(_logits(loaded), _logits(model), rtol=0, atol=0)


def test_mismatched_weights_name_keys_and_shapes(tmp_path):
    model = tiny_model(tiny_config("diffv2"))
    checkpoint = lightning_checkpoint(model)
    checkpoint["hyper_parameters"]["model_config"].update(n_layers=3, n_kv_heads=4)
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(CheckpointError) as error:
        load_for_inference(tmp_path / "bad.ckpt")
    message = str(error.value)
    assert "missing keys (10)" in message and "layers.2.input_layernorm.weight" in message and "... and 2 more" in message
    assert "layers.0.self_attn.k_proj.weight: checkpoint (32, 64), config (64, 64)" in message


def test_unexpected_keys_are_named(tmp_path):
    model = tiny_model(tiny_config("diffv2"))
    checkpoint = lightning_checkpoint(model)
    checkpoint["hyper_parameters"]["model_config"]["attention"] = "baseline"
    torch.save(checkpoint, tmp_path / "wrong_variant.ckpt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(2\): layers.0.self_attn.lambda_proj.weight"):
        load_for_inference(tmp_path / "wrong_variant.ckpt")


def test_path_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_for_inference(tmp_path / "missing.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither a sharded checkpoint"):
        load_for_inference(tmp_path / "empty")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        load_for_inference(tmp_path / "notes.txt")
    torch.save({"state_dict": {}, "hyper_parameters": {}}, tmp_path / "no_config.ckpt")
    with pytest.raises(CheckpointError, match=r"no hyper_parameters\['model_config'\]"):
        load_for_inference(tmp_path / "no_config.ckpt")


def test_state_dict_for_training(make_checkpoint):
    path, model = make_checkpoint("diffv1")
    config_dict, state_dict = load_state_dict_for_training(path)
    assert config_dict["attention"] == "diffv1" and config_dict["n_layers"] == 2
    assert state_dict.keys() == model.state_dict().keys()
