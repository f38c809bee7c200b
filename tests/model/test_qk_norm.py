"""QK-norm (model.architecture.qk_norm) against attention written out by hand, for every variant.

The math, per token t and head j (d = head_dim, w_q / w_k the two d-sized weights shared by all heads):
    q_tj <- w_q * q_tj / sqrt(mean_i q_tji^2 + eps)      (the same for k with w_k)
then RoPE, then the variant's attention as before. DIFF V1's two query halves (q1, q2) are both normed by
w_q and its two key halves by w_k.
"""

import itertools
import math

import pytest
import torch

from diffv2_lit.model import ModelConfig, Transformer, count_parameters
from diffv2_lit.model.attention import build_attention
from diffv2_lit.model.config import ConfigError
from diffv2_lit.model.rope import rope_cos_sin

D, H, H_KV, T = 16, 4, 2, 5


def _config(attention, qk_norm=True, **fields):
    return ModelConfig(vocab_size=32, n_layers=2, dim=D, n_heads=H, n_kv_heads=H_KV, max_seq_len=16,
                       attention=attention, attn_backend="eager", qk_norm=qk_norm, **fields)


def _hand_rms(x, weight, eps):
    out = torch.empty_like(x)
    for idx in itertools.product(*(range(n) for n in x.shape[:-1])):
        row = x[idx]
        out[idx] = weight * row / math.sqrt(float((row ** 2).sum()) / row.numel() + eps)
    return out


def _hand_rope(x, theta=10000.0):
    """Rotate-half RoPE, one position and one pair (i, i + d/2) at a time."""
    out = x.clone()
    half = x.shape[-1] // 2
    for t in range(x.shape[1]):
        for i in range(half):
            angle = t / theta ** (2 * i / x.shape[-1])
            a, b = x[:, t, :, i], x[:, t, :, i + half]
            out[:, t, :, i] = a * math.cos(angle) - b * math.sin(angle)
            out[:, t, :, i + half] = b * math.cos(angle) + a * math.sin(angle)
    return out


def _softmax_attend(q, k, v):
    """q [T, d], k [T, d], v [T, dv] of one head: causal softmax attention, written out."""
    scores = q @ k.T / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores, -1) @ v


def _hand_forward(attn, x):
    cfg, d = attn.config, attn.config.head_dim
    q = (x @ attn.q_proj.weight.T).view(1, T, -1, d)
    k = (x @ attn.k_proj.weight.T).view(1, T, H_KV, d)
    v = (x @ attn.v_proj.weight.T).view(1, T, H_KV, d)
    q = _hand_rope(_hand_rms(q, attn.q_norm.weight, cfg.norm_eps))
    k = _hand_rope(_hand_rms(k, attn.k_norm.weight, cfg.norm_eps))
    heads = []
    if cfg.attention == "baseline":
        group = q.shape[2] // H_KV
        heads = [_softmax_attend(q[0, :, j], k[0, :, j // group], v[0, :, j // group]) for j in range(H)]
    elif cfg.attention == "diffv2":  # pair (2i, 2i+1), both heads of the pair read KV head 2i // group
        group = q.shape[2] // H_KV
        gate = torch.sigmoid(x @ attn.lambda_proj.weight.T)[0]  # [T, h]
        for i in range(H):
            kv = (2 * i) // group
            o1 = _softmax_attend(q[0, :, 2 * i], k[0, :, kv], v[0, :, kv])
            o2 = _softmax_attend(q[0, :, 2 * i + 1], k[0, :, kv], v[0, :, kv])
            heads.append(o1 - gate[:, i:i + 1] * o2)
    else:  # diffv1: h/2 heads, q1 = head 2i, q2 = 2i+1; KV head j = (k 2j, k 2j+1), value 2d wide
        group = (H // 2) // (H_KV // 2)
        lam = attn.lambda_full()
        for i in range(H // 2):
            j = i // group
            wide_v = torch.cat([v[0, :, 2 * j], v[0, :, 2 * j + 1]], dim=-1)
            diff = (_softmax_attend(q[0, :, 2 * i], k[0, :, 2 * j], wide_v)
                    - lam * _softmax_attend(q[0, :, 2 * i + 1], k[0, :, 2 * j + 1], wide_v))
            diff = _hand_rms(diff.unsqueeze(0), attn.subln.weight, cfg.norm_eps)[0] * (1 - attn.lambda_init)
            heads.extend(diff.split(d, dim=-1))
    return torch.cat(heads, dim=-1).unsqueeze(0) @ attn.o_proj.weight.T


def _without_qk_norm(attn):
    """The same weights in a module built without QK-norm: the norm must change the output."""
    plain = build_attention(attn.config.replace(qk_norm=False), attn.layer_idx).double()
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if "_norm." not in k or "subln" in k})
    return plain


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_qk_norm_attention_equals_the_hand_computation(attention):
    torch.manual_seed(0)
    attn = build_attention(_config(attention), layer_idx=1).double()
    attn.init_weights(std=0.3, out_std=0.3)
    with torch.no_grad():  # weights away from 1, so a missing or misplaced norm weight shows
        attn.q_norm.weight.uniform_(0.5, 2.0)
        attn.k_norm.weight.uniform_(0.5, 2.0)
    x = torch.randn(1, T, D, dtype=torch.float64) * 3.0
    cos, sin = rope_cos_sin(torch.arange(T), attn.head_dim, 10000.0, dtype=torch.float64)
    got = attn(x, cos, sin)
    want = _hand_forward(attn, x)
    # rope_cos_sin takes its frequencies in fp32, so the two agree to ~1e-7, not to fp64 precision.
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, _without_qk_norm(attn)(x, cos, sin), atol=1e-2)


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_qk_norm_makes_the_output_invariant_to_scaling_q_and_k_projections(attention):
    """The point of QK-norm: q and k enter attention at unit RMS per head, whatever their projections' scale."""
    torch.manual_seed(1)
    # eps ~ 0: the norm is then exactly scale-free, so only rounding separates the two outputs.
    attn = build_attention(_config(attention, norm_eps=1e-30), layer_idx=0).double()
    attn.init_weights(std=0.3, out_std=0.3)
    x = torch.randn(1, T, D, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(T), attn.head_dim, 10000.0, dtype=torch.float64)
    before = attn(x, cos, sin)
    with torch.no_grad():
        attn.q_proj.weight.mul_(50.0)
        attn.k_proj.weight.mul_(7.0)
    assert torch.allclose(attn(x, cos, sin), before, atol=1e-10)


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_parameter_count_adds_two_head_dim_weights_per_layer_and_equals_numel(attention):
    on, off = _config(attention), _config(attention, qk_norm=False)
    counts_on, counts_off = count_parameters(on), count_parameters(off)
    assert counts_on["attention"] - counts_off["attention"] == on.n_layers * 2 * on.head_dim
    model = Transformer(on)
    assert counts_on["total"] == sum(p.numel() for p in model.parameters())
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight"} <= names
    assert not any("q_norm" in n for n, _ in Transformer(off).named_parameters())


def test_init_weights_sets_qk_norm_weights_to_one():
    with torch.device("meta"):
        model = Transformer(_config("diffv2"))
    model.to_empty(device="cpu")
    model.init_weights()
    assert torch.equal(model.layers[1].self_attn.q_norm.weight, torch.ones(D // H))
    assert torch.equal(model.layers[1].self_attn.k_norm.weight, torch.ones(D // H))


def test_qk_norm_must_be_a_bool():
    with pytest.raises(ConfigError, match="qk_norm"):
        _config("baseline", qk_norm="yes")
