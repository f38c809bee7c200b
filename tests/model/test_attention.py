"""Attention kernels against the eager reference, and the head pairing of DIFF V2 / DIFF V1 against
implementations written independently from docs/design.md section 1 (explicit repeat_kv, per-pair loops)."""

import math

import pytest
import torch

from diffv2_lit.model import ConfigError, ModelConfig, Transformer
from diffv2_lit.model import attention as attention_module
from diffv2_lit.model.attention import (DiffV1Attention, DiffV2Attention, build_attention, eager_attention,
                                        sdpa_attention)
from diffv2_lit.model.rope import apply_rope, rope_cos_sin

SHAPES = [  # (query heads, kv heads): MHA, GQA, MQA
    pytest.param(4, 4, id="mha"),
    pytest.param(8, 2, id="gqa"),
    pytest.param(6, 1, id="mqa"),
]


def _qkv(n_q, n_kv, n_queries=7, n_keys=7, head_dim=16, value_dim=16, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, n_queries, n_q, head_dim, generator=gen, dtype=dtype)
    k = torch.randn(2, n_keys, n_kv, head_dim, generator=gen, dtype=dtype)
    v = torch.randn(2, n_keys, n_kv, value_dim, generator=gen, dtype=dtype)
    return q, k, v


def naive_attention(q, k, v):
    """Textbook causal attention: repeat_kv copies, one head at a time, float64."""
    n_rep = q.shape[2] // k.shape[2]
    k, v = k.repeat_interleave(n_rep, dim=2).double(), v.repeat_interleave(n_rep, dim=2).double()
    q = q.double()
    n_queries, n_keys = q.shape[1], k.shape[1]
    out = torch.empty(q.shape[:3] + (v.shape[-1],), dtype=torch.float64)
    for head in range(q.shape[2]):
        scores = q[:, :, head] @ k[:, :, head].transpose(1, 2) / q.shape[-1] ** 0.5
        for i in range(n_queries):
            scores[:, i, n_keys - n_queries + i + 1:] = float("-inf")
        out[:, :, head] = torch.softmax(scores, -1) @ v[:, :, head]
    return out


def _rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize(("n_q", "n_kv"), SHAPES)
def test_eager_matches_textbook_attention(n_q, n_kv):
    q, k, v = _qkv(n_q, n_kv, dtype=torch.float64)
    assert _rel_err(eager_attention(q, k, v)[0], naive_attention(q, k, v)) < 1e-12


@pytest.mark.parametrize(("n_q", "n_kv"), SHAPES)
@pytest.mark.parametrize(("n_queries", "n_keys"), [(7, 7), (1, 9), (3, 9)], ids=["train", "decode", "prefill"])
@pytest.mark.parametrize("value_dim", [16, 32], ids=["dv=d", "dv=2d"])
def test_sdpa_matches_eager_fp32(n_q, n_kv, n_queries, n_keys, value_dim):
    q, k, v = _qkv(n_q, n_kv, n_queries, n_keys, value_dim=value_dim)
    assert _rel_err(sdpa_attention(q, k, v), eager_attention(q, k, v)[0]) < 1e-5


def test_eager_probs_are_causal_and_normalised():
    q, k, v = _qkv(8, 2)
    _, probs, _ = eager_attention(q, k, v)
    assert torch.allclose(probs.sum(-1), torch.ones(()))
    assert torch.all(probs.triu(diagonal=1) == 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flash-attn needs CUDA")
@pytest.mark.parametrize(("n_q", "n_kv"), SHAPES)
def test_flash_matches_eager_bf16(n_q, n_kv):
    pytest.importorskip("flash_attn")
    from diffv2_lit.model.attention import flash_attention

    q, k, v = (t.cuda().bfloat16() for t in _qkv(n_q, n_kv, 64, 64, head_dim=64, value_dim=128))
    assert _rel_err(flash_attention(q, k, v), eager_attention(q.float(), k.float(), v.float())[0]) < 2e-2


# ---- DIFF V2 ----------------------------------------------------------------------------------


def _layer(attention, n_heads=4, n_kv_heads=2, seed=0, backend="eager", dtype=torch.float64):
    config = ModelConfig(dim=32, n_heads=n_heads, n_kv_heads=n_kv_heads, head_dim=8, attention=attention,
                         attn_backend=backend, n_layers=3)
    torch.manual_seed(seed)
    layer = build_attention(config, layer_idx=2)
    layer.init_weights(std=0.3, out_std=0.3)
    x = torch.randn(2, 6, 32)
    return layer.to(dtype), x.to(dtype)


def _rope(layer, n_tokens, dtype=torch.float64):
    return rope_cos_sin(torch.arange(n_tokens), layer.head_dim, 10000.0, dtype)


def reference_diffv2(layer, x, pair_heads):
    """DIFF V2 from the write-up, with a pluggable pairing: returns the o_proj input."""
    cos, sin = _rope(layer, x.shape[1])
    batch, n_tokens, _ = x.shape
    q = apply_rope(layer.q_proj(x).view(batch, n_tokens, -1, layer.head_dim), cos, sin)
    k = apply_rope(layer.k_proj(x).view(batch, n_tokens, -1, layer.head_dim), cos, sin)
    v = layer.v_proj(x).view(batch, n_tokens, -1, layer.head_dim)
    o = naive_attention(q, k, v)
    first, second = pair_heads(o)
    return first - torch.sigmoid(layer.lambda_proj(x)).unsqueeze(-1) * second


def interleaved_pairs(o):  # the right pairing: (2i, 2i+1)
    return o[:, :, 0::2], o[:, :, 1::2]


def half_split_pairs(o):  # the documented wrong pairing: chunk(2)
    return o.chunk(2, dim=2)


def _context(layer, x):
    captured = {}
    handle = layer.o_proj.register_forward_pre_hook(lambda m, args: captured.setdefault("ctx", args[0]))
    cos, sin = _rope(layer, x.shape[1])
    layer(x, cos, sin)
    handle.remove()
    return captured["ctx"].view(x.shape[0], x.shape[1], -1, layer.head_dim)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 4), (4, 2), (6, 2), (4, 1)])
def test_diffv2_pairs_adjacent_heads(backend, n_heads, n_kv_heads):
    layer, x = _layer("diffv2", n_heads, n_kv_heads, backend=backend)
    expected = reference_diffv2(layer, x, interleaved_pairs)
    assert _rel_err(_context(layer, x), expected) < 1e-10


@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 2), (6, 2), (4, 4)])
def test_diffv2_is_not_the_half_split_implementation(n_heads, n_kv_heads):
    """The check above has teeth: the chunk(2) pairing gives a different layer output."""
    layer, x = _layer("diffv2", n_heads, n_kv_heads)
    wrong = reference_diffv2(layer, x, half_split_pairs)
    assert _rel_err(_context(layer, x), wrong) > 0.1


def _make_pairs_identical(layer):
    """Copy the q_proj rows of head 2i into head 2i+1 and saturate sigmoid(lambda) at 1."""
    d = layer.head_dim
    with torch.no_grad():
        for pair in range(layer.config.n_heads):
            first = slice(2 * pair * d, (2 * pair + 1) * d)
            second = slice((2 * pair + 1) * d, (2 * pair + 2) * d)
            layer.q_proj.weight[second] = layer.q_proj.weight[first]
        layer.lambda_proj.weight.zero_()


def test_identical_pairs_with_saturated_lambda_output_zero():
    layer, x = _layer("diffv2", 4, 2)
    _make_pairs_identical(layer)
    layer.lambda_gate = lambda x: torch.ones(x.shape[:2] + (layer.config.n_heads,), dtype=x.dtype)
    assert _context(layer, x).abs().max() < 1e-12


def test_identical_pairs_with_half_split_do_not_cancel():
    layer, x = _layer("diffv2", 4, 2)
    _make_pairs_identical(layer)
    with torch.no_grad():
        layer.lambda_proj.weight.zero_()
    wrong = reference_diffv2(layer, x, half_split_pairs)
    assert wrong.abs().max() > 1e-2


def test_diffv2_lambda_starts_near_one_half():
    config = ModelConfig(dim=256, n_heads=4, n_kv_heads=2, attention="diffv2")
    layer = DiffV2Attention(config, 0)
    layer.init_weights(0.02, 0.01)
    gate = layer.lambda_gate(torch.nn.functional.rms_norm(torch.randn(4, 64, 256), (256,)))
    assert 0.45 < gate.mean().item() < 0.55


# ---- DIFF V1 ----------------------------------------------------------------------------------


def reference_diffv1(layer, x):
    """DIFF V1 flash-path layout: q/k viewed as (heads, 2, d), v as (kv heads, 2d), q1 with k1, q2 with k2."""
    cos, sin = _rope(layer, x.shape[1])
    batch, n_tokens, _ = x.shape
    d = layer.head_dim
    q = apply_rope(layer.q_proj(x).view(batch, n_tokens, -1, d), cos, sin).view(batch, n_tokens, -1, 2, d)
    k = apply_rope(layer.k_proj(x).view(batch, n_tokens, -1, d), cos, sin).view(batch, n_tokens, -1, 2, d)
    v = layer.v_proj(x).view(batch, n_tokens, -1, 2 * d)
    a1 = naive_attention(q[:, :, :, 0], k[:, :, :, 0], v)
    a2 = naive_attention(q[:, :, :, 1], k[:, :, :, 1], v)
    lam = (torch.exp((layer.lambda_q1 * layer.lambda_k1).sum()) - torch.exp((layer.lambda_q2 * layer.lambda_k2).sum())
           + 0.8 - 0.6 * math.exp(-0.3 * layer.layer_idx))
    diff = a1 - lam * a2
    normed = diff / diff.pow(2).mean(-1, keepdim=True).add(layer.config.norm_eps).sqrt() * layer.subln.weight
    return normed * (1 - layer.lambda_init)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize(("n_heads", "n_kv_heads"), [(4, 4), (8, 4), (8, 2)])
def test_diffv1_matches_reference(backend, n_heads, n_kv_heads):
    layer, x = _layer("diffv1", n_heads, n_kv_heads, backend=backend)
    with torch.no_grad():
        layer.subln.weight.uniform_(0.5, 1.5)
    context = _context(layer, x).reshape(2, 6, n_heads // 2, -1)
    assert _rel_err(context, reference_diffv1(layer, x)) < 1e-10


def test_diffv1_lambda_init_schedule():
    config = ModelConfig(attention="diffv1")
    assert DiffV1Attention(config, 0).lambda_init == pytest.approx(0.2)
    assert DiffV1Attention(config, 5).lambda_init == pytest.approx(0.8 - 0.6 * 2.718281828 ** -1.5, rel=1e-6)


# ---- whole-model backend agreement ------------------------------------------------------------


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_model_sdpa_matches_eager(attention):
    config = ModelConfig(vocab_size=64, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                         attention=attention, attn_backend="eager")
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    ids = torch.randint(0, 64, (2, 24))
    eager = model(ids)
    for block in model.layers:
        block.self_attn.config = config.replace(attn_backend="sdpa")
    assert _rel_err(model(ids), eager) < 1e-5


# ---- attn_backend 'flash' refuses what flash-attn cannot run, in one line (issue 19.10) ----------------


def test_flash_path_refuses_fp32_inputs_naming_the_dtype_and_both_fixes():
    q, k, v = _qkv(4, 2)  # fp32, as a 32-true run would hand them over
    expected = ("attn_backend='flash' got float32 attention inputs, but flash-attn runs fp16/bf16 only: train "
                "with --trainer.precision bf16-mixed, or set model.architecture.attn_backend sdpa (or auto, which "
                "uses SDPA outside bf16/fp16).")
    with pytest.raises(ConfigError) as raised:
        attention_module.check_flash_inputs(q, k, v)
    assert str(raised.value) == expected
    with pytest.raises(ConfigError) as raised:  # the flash path itself stops there, before importing flash-attn
        attention_module.flash_attention(q, k, v)
    assert str(raised.value) == expected
    with pytest.raises(ConfigError, match=r"got bfloat16/float32 attention inputs"):
        attention_module.check_flash_inputs(q.bfloat16(), k.bfloat16(), v)


def test_flash_path_refuses_cpu_tensors():
    q, k, v = (t.bfloat16() for t in _qkv(4, 2))
    with pytest.raises(ConfigError, match=r"^attn_backend='flash' got attention inputs on cpu, but flash-attn runs "
                                          r"on CUDA only: run on a GPU, or set model.architecture.attn_backend sdpa"):
        attention_module.check_flash_inputs(q, k, v)
