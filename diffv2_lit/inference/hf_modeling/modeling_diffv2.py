"""Hugging Face model code for diffv2-lit exports: DIFF Transformer V2, DIFF V1 (and the baseline).

Copied into every exported DIFF folder and loaded with
`AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`. Self-contained: depends on torch
and transformers only, never on diffv2_lit, and computes exactly what diffv2_lit.model computes (the
export tests compare logits). Parameter names are HF Llama's plus `self_attn.lambda_proj` (DIFF V2) and
`self_attn.lambda_{q1,k1,q2,k2}`, `self_attn.subln` (DIFF V1).

Shape legend
    B batch   T tokens of this call   S cached + current tokens   D hidden_size   d head_dim
    h num_attention_heads (heads reaching o_proj)   h_kv num_key_value_heads
    Hq query heads the kernel sees: h (baseline), 2h (diffv2), h/2 twice (diffv1)

The KV cache (a transformers `DynamicCache`) holds k_proj/v_proj outputs after RoPE, [B, h_kv, S, d], for
every variant: DIFF V2 decodes with the baseline's cache; DIFF V1 reads the same cache twice per step.
Padding (a 2-D attention_mask, as `generate` and lm-evaluation-harness pass for batches) is supported.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_diffv2 import DiffV2LitConfig

try:  # transformers >= 5: init helpers that leave weights loaded from the checkpoint alone
    from transformers import initialization as _init
except ImportError:
    from torch.nn import init as _init

# transformers 5 renamed the output/input field past_key_values -> cache; support both.
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
_SDPA_HAS_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


# ---- building blocks ------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Normalised in fp32, cast back, then scaled (as HF Llama and diffv2_lit compute it)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """position_ids [B, T] -> cos, sin [B, T, d] (rotate-half convention: channel c pairs with c + d/2)."""
    exponents = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = position_ids.float()[..., None] * inv_freq
    angles = torch.cat([freqs, freqs], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, d]; cos, sin [B, T, d]."""
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat([-second, first], dim=-1)
    return x * cos[:, :, None] + rotated * sin[:, :, None]


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Causal GQA attention. q [B, T, Hq, d], k [B, S, h_kv, d], v [B, S, h_kv, dv], mask [B, 1, T, S] bool or
    None (None: plain causal, the T queries aligned to the last T keys) -> [B, T, Hq, dv]."""
    n_queries, n_keys = q.shape[1], k.shape[1]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    is_causal = False
    if mask is None and n_queries > 1:
        if n_queries == n_keys:
            is_causal = True
        else:  # chunked prefill after a cache: SDPA's is_causal would align top-left
            mask = _causal(n_queries, n_keys, q.device)[None, None]
    gqa = {}
    if q.shape[1] != k.shape[1]:
        if _SDPA_HAS_GQA:
            gqa = {"enable_gqa": True}
        else:
            repeat = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, **gqa)
    return out.transpose(1, 2)


def _causal(n_queries: int, n_keys: int, device) -> torch.Tensor:
    """[T, S] bool: query i sits at absolute position S - T + i."""
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= query_pos[:, None]


def padding_mask(attention_mask: torch.Tensor | None, n_queries: int, n_keys: int) -> torch.Tensor | None:
    """2-D attention_mask [B, S] (1 = token, 0 = padding) -> [B, 1, T, S] bool, or None without padding.

    Every query may always read its own position, so the rows of padding queries are never empty
    (an all-False row would make SDPA return NaN); their outputs are ignored anyway.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError("this model takes a 2-D attention_mask [batch, keys] (1 = token, 0 = padding).")
    attention_mask = attention_mask[:, -n_keys:].bool()
    if bool(attention_mask.all()):
        return None
    causal = _causal(n_queries, n_keys, attention_mask.device)
    own = torch.zeros_like(causal)
    own[torch.arange(n_queries), torch.arange(n_keys - n_queries, n_keys)] = True
    return ((causal[None] & attention_mask[:, None, :]) | own[None])[:, None]


class SwiGLU(nn.Module):
    def __init__(self, config: DiffV2LitConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---- attention variants ---------------------------------------------------------------------------


class Attention(nn.Module):
    """Baseline GQA attention; the DIFF variants change the query heads and `combine`."""

    query_heads_factor = 1  # query heads per output head

    def __init__(self, config: DiffV2LitConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_kv_heads = config.num_key_value_heads
        dim, d = config.hidden_size, config.head_dim
        self.q_proj = nn.Linear(dim, self.query_heads_factor * config.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * d, dim, bias=False)
        # QK-norm: one d-sized weight for q and one for k, shared by every head (DIFF V1's q1 and q2 alike).
        qk_norm = getattr(config, "qk_norm", False)
        self.q_norm = RMSNorm(d, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(d, config.rms_norm_eps) if qk_norm else None

    def forward(self, x, cos, sin, mask, cache: Cache | None) -> torch.Tensor:
        batch, n_tokens, _ = x.shape
        q = self.q_proj(x).view(batch, n_tokens, -1, self.head_dim)
        k = self.k_proj(x).view(batch, n_tokens, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # before RoPE, per head over d
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = self.v_proj(x).view(batch, n_tokens, self.n_kv_heads, self.head_dim)
        if cache is not None:  # the cache is [B, h_kv, S, d], the layout of every HF model
            k, v = cache.update(k.transpose(1, 2), v.transpose(1, 2), self.layer_idx)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        return self.o_proj(self.combine(x, q, k, v, mask).reshape(batch, n_tokens, -1))

    def combine(self, x, q, k, v, mask) -> torch.Tensor:
        return attend(q, k, v, mask)


class DiffV2Attention(Attention):
    """2h query heads, one attention call; pair i = heads (2i, 2i+1): o_2i - sigmoid(lambda_i(x)) * o_2i+1."""

    query_heads_factor = 2

    def __init__(self, config: DiffV2LitConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.lambda_proj = nn.Linear(config.hidden_size, config.num_attention_heads, bias=False)

    def combine(self, x, q, k, v, mask) -> torch.Tensor:
        out = attend(q, k, v, mask)
        gate = torch.sigmoid(self.lambda_proj(x)).unsqueeze(-1)  # [B, T, h, 1]
        return out[:, :, 0::2] - gate * out[:, :, 1::2]


class DiffV1Attention(Attention):
    """h/2 differential heads: query pair (2i, 2i+1) = (q1, q2), KV pair (2j, 2j+1) = (k1, k2), value of
    KV head j = its two d-wide value slices side by side. softmax(q1 k1) - lambda softmax(q2 k2), then a
    per-head RMSNorm over 2d and (1 - lambda_init)."""

    def __init__(self, config: DiffV2LitConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
        d = config.head_dim
        self.lambda_q1, self.lambda_k1 = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.lambda_q2, self.lambda_k2 = nn.Parameter(torch.zeros(d)), nn.Parameter(torch.zeros(d))
        self.subln = RMSNorm(2 * d, eps=config.rms_norm_eps)

    def lambda_full(self) -> torch.Tensor:
        """In at least fp32 from the dot products on (a bf16 model's bf16 products would be off by ~0.4%)."""
        dtype = torch.promote_types(self.lambda_q1.dtype, torch.float32)
        q1, k1, q2, k2 = (v.to(dtype) for v in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2))
        # mul + sum rather than dot/matmul, which autocast would run in bf16 again.
        return torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + self.lambda_init

    def combine(self, x, q, k, v, mask) -> torch.Tensor:
        batch, n_keys = v.shape[:2]
        wide_v = v.reshape(batch, n_keys, self.n_kv_heads // 2, 2 * self.head_dim)
        out_1 = attend(q[:, :, 0::2], k[:, :, 0::2], wide_v, mask)
        out_2 = attend(q[:, :, 1::2], k[:, :, 1::2], wide_v, mask)
        diff = out_1 - self.lambda_full().to(out_1.dtype) * out_2
        return self.subln(diff) * (1.0 - self.lambda_init)


ATTENTION_CLASSES = {"baseline": Attention, "diffv2": DiffV2Attention, "diffv1": DiffV1Attention}


class DecoderLayer(nn.Module):
    def __init__(self, config: DiffV2LitConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = ATTENTION_CLASSES[config.attention_variant](config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x, cos, sin, mask, cache) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


# ---- transformers models --------------------------------------------------------------------------


class DiffV2LitPreTrainedModel(PreTrainedModel):
    config_class = DiffV2LitConfig
    base_model_prefix = "model"
    _no_split_modules = ["DecoderLayer"]
    _supports_sdpa = True
    _supports_cache_class = True  # transformers 4.x: this model takes Cache objects

    def _init_weights(self, module: nn.Module) -> None:
        """Weights the checkpoint does not hold (none, for an export) get the training init."""
        super()._init_weights(module)  # Linear / Embedding: N(0, initializer_range)
        if isinstance(module, RMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, DiffV1Attention):
            for vector in (module.lambda_q1, module.lambda_k1, module.lambda_q2, module.lambda_k2):
                _init.normal_(vector, mean=0.0, std=0.1)


class DiffV2LitModel(DiffV2LitPreTrainedModel):
    def __init__(self, config: DiffV2LitConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        """-> (last hidden state [B, T, D], cache)."""
        h = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = _new_cache(self.config)
        past = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            position_ids = _positions(attention_mask, past, input_ids.shape[1], input_ids.device)
        cos, sin = rope_cos_sin(position_ids, self.config.head_dim, self.config.rope_theta, h.dtype)
        mask = padding_mask(attention_mask, input_ids.shape[1], past + input_ids.shape[1])
        for layer in self.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.norm(h), cache


def _new_cache(config) -> DynamicCache:
    try:
        return DynamicCache(config=config)
    except TypeError:  # transformers 4.x
        return DynamicCache()


def _positions(attention_mask, past: int, n_tokens: int, device) -> torch.Tensor:
    """[B or 1, T]: left padding shifts positions so that every sequence's first token is at 0."""
    if attention_mask is None:
        return (torch.arange(n_tokens, device=device) + past)[None]
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -n_tokens:]


class DiffV2LitForCausalLM(DiffV2LitPreTrainedModel, GenerationMixin):
    def __init__(self, config: DiffV2LitConfig) -> None:
        super().__init__(config)
        self.model = DiffV2LitModel(config)
        # Tied embeddings reuse embed_tokens.weight in forward (as diffv2_lit does): no second parameter to tie.
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, past_key_values=None,
                use_cache=None, labels=None, logits_to_keep: int = 0, return_dict=None, **kwargs):
        """Logits [B, T, V] (fp32 upcast only for the loss). Extra generate() kwargs are accepted and ignored."""
        cache = cache if cache is not None else past_key_values
        use_cache = self.config.use_cache if use_cache is None else use_cache
        hidden, cache = self.model(input_ids, attention_mask, position_ids, cache, use_cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden) if self.lm_head is not None else F.linear(hidden, self.model.embed_tokens.weight)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache if use_cache else None})
