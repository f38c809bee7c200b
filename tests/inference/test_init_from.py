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


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_only_rank_zero_reads_the_source_and_every_rank_gets_its_weights(make_checkpoint, tmp_path, strategy):
    """Issue 19.8: one read per job, not one per GPU; the weights training starts from are the source's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ckpt, model = make_checkpoint("diffv2")
    root = Path(__file__).parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    architecture = repr(dataclasses.asdict(model.config) | {"attn_backend": "auto"})
    result = subprocess.run([sys.executable, str(root / "tests" / "training" / "start_weights_run.py"), "--source", str(ckpt),
                             "--out", str(tmp_path / "result"), "--strategy", strategy, "--architecture", architecture],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"result.rank{rank}") for rank in (0, 1))
    assert rank0["opens"] >= 1 and rank1["opens"] == 0
    assert "initialised the model's weights from" in result.stdout + result.stderr
    expected = model.state_dict()
    assert rank0["weights"].keys() == expected.keys()
    for name, value in rank0["weights"].items():
        assert torch.equal(value, expected[name]), name
