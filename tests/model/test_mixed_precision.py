"""The model under bf16 compute with fp32 weights (Lightning's `bf16-mixed` autocast, FSDP2's
MixedPrecisionPolicy): q, k and v reach the kernel in one dtype, and the KV cache follows the compute
dtype. Both broke on GPUs (issue 11, items 3 and 8) and are visible on the CPU."""

import pytest
import torch

from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.model import attention as attention_module

N_HEADS, HEAD_DIM, BATCH, TOKENS = 4, 16, 2, 12


def fp32_model(attention: str) -> Transformer:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=97, n_layers=2, dim=48, n_heads=N_HEADS, n_kv_heads=2, head_dim=HEAD_DIM,
                         max_seq_len=64, attention=attention, attn_backend="sdpa")
    model = Transformer(config)
    model.init_weights()
    return model


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_under_autocast_q_k_and_v_reach_the_kernel_in_bf16(attention, monkeypatch):
    """Under bf16 autocast the projections are bf16; RoPE must not turn q and k into fp32 beside a bf16 v
    (`attn_backend: auto` would never pick flash-attn, `flash` would get an fp32 query, and fp32 copies
    of the 2h query heads would be saved for backward). CPU SDPA hides it by casting inside autocast, so
    the kernel's inputs are read on the way in."""
    seen = []
    real_attend = attention_module.attend

    def recording_attend(q, k, v, backend, mask=None):
        seen.append((q.dtype, k.dtype, v.dtype))
        return real_attend(q, k, v, backend, mask)

    monkeypatch.setattr(attention_module, "attend", recording_attend)
    model = fp32_model(attention)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randint(0, 97, (BATCH, TOKENS))).float().sum().backward()
    assert seen and set(seen) == {(torch.bfloat16,) * 3}


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_kv_cache_takes_the_compute_dtype_not_the_weights(attention):
    """fp32 weights computing in bf16: a cache in the weights' dtype would hand fp32 keys to bf16 queries."""
    model = fp32_model(attention).eval()
    prompt = torch.randint(0, 97, (1, 5))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(batch_size=1, max_len=8)
        model(prompt, cache)
        out = model.generate(prompt, max_new_tokens=3, temperature=0)
    assert cache.keys[0].dtype == torch.bfloat16 and cache.values[-1].dtype == torch.bfloat16
    assert cache.keys[0].shape == (1, 8, 2, HEAD_DIM)
    assert out.shape == (1, 8)
