"""DIFF V1's lambda = exp(lambda_q1 . lambda_k1) - exp(lambda_q2 . lambda_k2) + lambda_init is taken in fp32 from
the products on, also for bf16 parameters (issue 19.10), in diffv2_lit.model and in the exported HF code."""

import pytest
import torch

from diffv2_lit.inference.hf_modeling.configuration_diffv2 import DiffV2LitConfig
from diffv2_lit.inference.hf_modeling.modeling_diffv2 import DiffV1Attention as HFDiffV1Attention
from diffv2_lit.model import ModelConfig
from diffv2_lit.model.attention import DiffV1Attention

HEAD_DIM = 64


def _bf16_lambdas(module) -> list[torch.Tensor]:
    """Vectors whose dot products are about 1 and 0.5, so a bf16 sum (8 bits) is off by up to 2^-9."""
    g = torch.Generator().manual_seed(0)
    vectors = [torch.empty(HEAD_DIM).uniform_(lo, hi, generator=g) for lo, hi in
               [(0.05, 0.2), (0.05, 0.2), (0.02, 0.15), (0.02, 0.15)]]
    module.to(torch.bfloat16)
    with torch.no_grad():
        for name, value in zip(("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"), vectors):
            getattr(module, name).copy_(value)
    return [getattr(module, name).detach().double() for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")]


def _expected(q1, k1, q2, k2, lambda_init: float) -> float:
    """The bf16 parameters' exact values, in fp64, written out."""
    return float(sum(a * b for a, b in zip(q1, k1)).exp() - sum(a * b for a, b in zip(q2, k2)).exp() + lambda_init)


@pytest.mark.parametrize("autocast", [False, True])
def test_lambda_of_bf16_parameters_is_exact_to_fp32(autocast):
    module = DiffV1Attention(ModelConfig(dim=256, n_heads=4, n_kv_heads=2, head_dim=HEAD_DIM, attention="diffv1"),
                             layer_idx=3)
    expected = _expected(*_bf16_lambdas(module), module.lambda_init)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got = module.lambda_full()
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, abs=2e-6)  # fp32 rounding; bf16 products were off by 2e-3


def test_exported_hf_lambda_of_bf16_parameters_is_exact_to_fp32():
    config = DiffV2LitConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=HEAD_DIM,
                             attention_variant="diffv1")
    module = HFDiffV1Attention(config, layer_idx=3)
    expected = _expected(*_bf16_lambdas(module), module.lambda_init)
    got = module.lambda_full()
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(expected, abs=2e-6)
