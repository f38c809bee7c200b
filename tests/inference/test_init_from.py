"""`--model.init_from`: an exported folder (or a checkpoint) starts a new training run, logits unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from diffv2_lit.inference.export import export
from diffv2_lit.checkpoint import ResumeError
from diffv2_lit.training.module import DecoderLM


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_training_module_starts_from_an_export_with_the_same_logits(make_checkpoint, tmp_path, attention):
    ckpt, model = make_checkpoint(attention)
    folder = tmp_path / "hf"
    export(ckpt, folder)
    module = DecoderLM(architecture=dataclasses.asdict(model.config), init_from=str(folder))
    module.configure_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    assert torch.equal(module(ids), model(ids))


def test_init_from_a_checkpoint_of_another_shape_is_refused(make_checkpoint):
    ckpt, model = make_checkpoint("diffv2")
    other = dataclasses.asdict(model.config) | {"attention": "baseline"}
    module = DecoderLM(architecture=other, init_from=str(ckpt))
    with pytest.raises(ResumeError, match=r"cannot initialise from .*model.architecture.attention: checkpoint 'diffv2'"):
        module.configure_model()
