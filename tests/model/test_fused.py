"""`model.kernels`: liger-kernel's RMSNorm and SwiGLU swapped in from outside the model.

The kernels themselves are Triton on CUDA only; their numbers are checked against the PyTorch path on a GPU
by `benchmarks/gpu_suite.py` (kernels section: loss and every gradient of one step). Here: what the swap
touches and keeps, and the refusals a CPU user meets.
"""

import importlib.util

import pytest
import torch

from diffv2_lit.errors import UsageError
from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.model.fused import LigerRMSNorm, LigerSwiGLU, kernels_problem, use_kernels
from diffv2_lit.model.norm import RMSNorm
from diffv2_lit.model.transformer import SwiGLU
from diffv2_lit.training.module import DecoderLM
from tests.training.helpers import tiny_data, tiny_trainer


def small_model(attention: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("quickstart", attention=attention, n_layers=3))
    model.init_weights()
    return model


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_liger_swaps_every_norm_and_mlp_and_keeps_the_parameters(attention):
    model = small_model(attention)
    before = {name: (param, param.detach().clone()) for name, param in model.named_parameters()}

    swapped = use_kernels(model, "liger")

    # Per block: the two pre-norms and the MLP (and DIFF V1's per-head sub-norm); plus the final norm.
    per_block = 3 + (attention == "diffv1")
    assert swapped == 3 * per_block + 1
    assert not any(type(m) in (RMSNorm, SwiGLU) for m in model.modules())
    assert sum(type(m) is LigerRMSNorm for m in model.modules()) == 3 * (per_block - 1) + 1
    assert sum(type(m) is LigerSwiGLU for m in model.modules()) == 3
    after = dict(model.named_parameters())
    assert list(after) == list(before)  # same names, same order: checkpoints and sharding see no change
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value)


def test_torch_kernels_leave_the_model_as_it_is():
    model = small_model("diffv2")
    classes = [type(m) for m in model.modules()]
    assert use_kernels(model, "torch") == 0
    assert [type(m) for m in model.modules()] == classes


def test_refusals_name_the_fix(monkeypatch):
    assert kernels_problem("torch", "cpu") is None
    assert "is not one of: torch, liger" in kernels_problem("triton", "cuda")
    assert "CUDA only, and this run is on cpu; use model.kernels=torch" in kernels_problem("liger", "cpu")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    assert "pip install 'diffv2-lit[liger]'" in kernels_problem("liger", "cuda")


def test_fit_with_liger_kernels_on_the_cpu_stops_before_training():
    module = DecoderLM(architecture={"preset": "quickstart", "n_layers": 2}, kernels="liger", warmup_steps=1,
                       max_steps=2)
    trainer = tiny_trainer(max_steps=2)
    with pytest.raises(UsageError, match="model.kernels='liger' runs Triton kernels on CUDA only"):
        trainer.fit(module, tiny_data())
    assert trainer.global_step == 0


def test_an_unknown_kernels_value_is_refused_at_construction():
    with pytest.raises(ValueError, match="model.kernels='triton' is not one of: torch, liger"):
        DecoderLM(kernels="triton")
