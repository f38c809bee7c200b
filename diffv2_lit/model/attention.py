"""Attention kernels (eager reference, PyTorch SDPA, flash-attn) and the three attention variants.

Shape legend
    B    batch                     T    query tokens of this call
    S    key tokens (S = T in training; S > T when decoding with a KV cache)
    D    model width               d    head dim
    h    output heads (reach o_proj)            h_kv  key/value heads
    Hq   query heads the kernel sees: h (baseline), 2h (diffv2), h/2 twice (diffv1)
    dv   value dim per head the kernel sees: d, or 2d for diffv1

Every variant has the same four projections with the same shapes except `q_proj` (D -> Hq*d for
diffv2, D -> h*d otherwise), the same constructor `(config, layer_idx)` and the same forward
`(x, cos, sin, cache) -> [B, T, D]`, so the decoder block never asks which variant it holds.

GQA grouping is contiguous everywhere: query head j reads KV head j // (Hq / h_kv), the convention
of flash-attn, SDPA `enable_gqa` and HF `repeat_kv`. DIFF V2 pairs heads (2i, 2i+1); since each GQA
group holds 2h/h_kv (an even number) consecutive query heads, both heads of a pair always read the
same KV head. Splitting the 2h heads into halves instead (`chunk(2)`) would pair heads of different
groups: the documented wrong implementation, which tests/model/test_attention.py guards against.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffv2_lit.model.config import CONFIG_PATH, ConfigError, ModelConfig, flash_attn_available
from diffv2_lit.model.norm import RMSNorm, at_least_fp32
from diffv2_lit.model.rope import apply_rope

# ----------------------------------------------------------------------------------------------
# Kernels. All take q [B, T, Hq, d], k [B, S, h_kv, d], v [B, S, h_kv, dv] and return
# [B, T, Hq, dv], causal, with the T queries aligned to the *last* T keys (decoding with a cache),
# unless `mask` [T, S] (True = may read) says which keys each query reads: a static KV cache hands
# over all its S slots, filled or not, and the mask (generation.StaticKVCache) does the rest. A document
# mask (documents.py) is [B, 1, T, S], or a FlexAttention BlockMask, which only `flex_attention` reads.
# ----------------------------------------------------------------------------------------------


def causal_mask(n_queries: int, n_keys: int, device: torch.device) -> Tensor:
    """[T, S] bool, True where query i (at absolute position S - T + i) may read key j."""
    query_pos = torch.arange(n_keys - n_queries, n_keys, device=device)
    return torch.arange(n_keys, device=device)[None, :] <= query_pos[:, None]


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Reference attention, written out. Returns (out [B,T,Hq,dv], probs [B,Hq,T,S], logits [B,Hq,T,S]).

    GQA without copies: queries are viewed as [B, h_kv, group, T, d] and broadcast against one KV head.
    """
    batch, n_queries, n_q_heads, head_dim = q.shape
    n_keys, n_kv_heads, value_dim = k.shape[1], k.shape[2], v.shape[3]
    group = n_q_heads // n_kv_heads
    q_grouped = q.view(batch, n_queries, n_kv_heads, group, head_dim).permute(0, 2, 3, 1, 4)
    keys_t = k.permute(0, 2, 3, 1).unsqueeze(2)  # [B, h_kv, 1, d, S]
    logits = (q_grouped @ keys_t) / math.sqrt(head_dim)  # [B, h_kv, group, T, S]
    allowed = causal_mask(n_queries, n_keys, q.device) if mask is None else mask
    if allowed.dim() == 4:  # a document mask [B, 1, T, S]: one more axis for the query group
        allowed = allowed.unsqueeze(2)
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=at_least_fp32(q.dtype)).to(v.dtype)
    out = probs @ v.permute(0, 2, 1, 3).unsqueeze(2)  # [B, h_kv, group, T, dv]
    out = out.permute(0, 3, 1, 2, 4).reshape(batch, n_queries, n_q_heads, value_dim)
    flat = (batch, n_q_heads, n_queries, n_keys)
    return out, probs.reshape(flat), logits.reshape(flat)


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """PyTorch SDPA with native GQA (`enable_gqa`, torch >= 2.5): no repeated KV copies."""
    n_queries, n_keys = q.shape[1], k.shape[1]
    if n_queries == 1 and q.shape[2] != k.shape[2]:
        return _sdpa_decode_step(q, k, v, mask)
    is_causal = mask is None and n_queries > 1
    if mask is None and 1 < n_queries < n_keys:  # chunked prefill with a cache: SDPA's is_causal aligns top-left
        mask, is_causal = causal_mask(n_queries, n_keys, q.device), False
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=is_causal, enable_gqa=q.shape[2] != k.shape[2],
    )
    return out.transpose(1, 2)


def _sdpa_decode_step(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """One decoding token under GQA: fold each KV head's query group into the query axis and make an
    ordinary h_kv-head call (no mask: the single new token reads every cached key). On CPU this avoids
    SDPA's per-extra-query-head cost, which DIFF V2's doubled query heads would otherwise pay."""
    batch, _, n_q_heads, head_dim = q.shape
    folded = q.view(batch, k.shape[2], n_q_heads // k.shape[2], head_dim)
    out = F.scaled_dot_product_attention(folded, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.reshape(batch, 1, n_q_heads, v.shape[-1])


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """flash-attn 2 (`flash_attn_func` is natively [B, T, H, d], GQA, and causal bottom-right aligned).

    Its value dim must equal the query dim, so DIFF V1's 2d-wide values are attended in d-wide
    slices and concatenated, as the reference implementation does.
    """
    check_flash_inputs(q, k, v)
    from flash_attn import flash_attn_func  # optional dependency, imported only when used

    head_dim = q.shape[-1]
    slices = v.split(head_dim, dim=-1)
    return torch.cat([flash_attn_func(q, k, v_slice, causal=True) for v_slice in slices], dim=-1)


FLASH_DTYPES = (torch.float16, torch.bfloat16)


@functools.cache
def _compiled_flex():
    """flex_attention compiled once per process: uncompiled it materialises the full score matrix."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_attention(q: Tensor, k: Tensor, v: Tensor, block_mask, compiled: bool | None = None) -> Tensor:
    """FlexAttention under a BlockMask (document masking on CUDA); native GQA, any value width.
    `compiled` None compiles on CUDA only (the CPU runs the unfused reference loop, used by the tests)."""
    from torch.nn.attention.flex_attention import flex_attention as flex_eager

    compiled = q.is_cuda if compiled is None else compiled
    kernel = _compiled_flex() if compiled else flex_eager
    out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=block_mask,
                 enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


def check_flash_inputs(q: Tensor, k: Tensor, v: Tensor) -> None:
    """flash-attn runs fp16/bf16 CUDA tensors only and fails deep inside its kernel otherwise: say which
    dtype or device arrived and the two fixes, before calling it."""
    dtypes = {t.dtype for t in (q, k, v)}
    if not dtypes <= set(FLASH_DTYPES) or len(dtypes) > 1:
        names = "/".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        raise ConfigError(
            f"attn_backend='flash' got {names} attention inputs, but flash-attn runs fp16/bf16 only: train with "
            f"--trainer.precision bf16-mixed, or set {CONFIG_PATH}.attn_backend sdpa (or auto, which uses SDPA "
            f"outside bf16/fp16).")
    if not q.is_cuda:
        raise ConfigError(
            f"attn_backend='flash' got attention inputs on {q.device.type}, but flash-attn runs on CUDA only: run "
            f"on a GPU, or set {CONFIG_PATH}.attn_backend sdpa (or auto).")


@functools.cache
def flash_installed() -> bool:
    """`flash_attn_available()`, asked once per process (Attention asks when the model is built):
    resolve_backend runs in every attention call, eager and activation-checkpoint recomputes included, and
    importlib's find_spec walks sys.path each time."""
    return flash_attn_available()


def resolve_backend(requested: str, q: Tensor, masked: bool = False) -> str:
    """`auto` means flash-attn when installed, on CUDA, in fp16/bf16; otherwise SDPA. flash-attn takes no
    mask, so a masked call (a static KV cache) goes to SDPA."""
    if requested == "flash" and masked:
        return "sdpa"
    if requested != "auto":
        return requested
    flash_ok = not masked and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and flash_installed()
    return "flash" if flash_ok else "sdpa"


def attend(q: Tensor, k: Tensor, v: Tensor, backend: str, mask: Tensor | None = None) -> Tensor:
    if mask is not None and not isinstance(mask, Tensor):  # a BlockMask: Transformer chose FlexAttention
        return flex_attention(q, k, v, mask)
    backend = resolve_backend(backend, q, masked=mask is not None)
    if backend == "flash":
        return flash_attention(q, k, v)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, mask)
    return eager_attention(q, k, v, mask)[0]


# ----------------------------------------------------------------------------------------------
# Variants
# ----------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Baseline Llama-style GQA attention; the base class of the DIFF variants.

    Subclasses change `n_query_heads`, `_combine` (kernel output -> h heads of width d) and
    `_diagnose` (the same computation through the eager kernel, keeping the internals).
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.n_kv_heads = config.n_kv_heads
        self.q_proj = nn.Linear(config.dim, config.n_query_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        # QK-norm (config.qk_norm): one d-sized weight for q and one for k, shared by all heads (Qwen3's
        # q_norm/k_norm, so the baseline exports as Qwen3). DIFF V1's two query halves q1, q2 are ordinary
        # d-wide heads here, so both are normed by the same q_norm (and k1, k2 by k_norm).
        self.q_norm = RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        self.k_norm = RMSNorm(config.head_dim, eps=config.norm_eps) if config.qk_norm else None
        if config.attn_backend == "auto":
            flash_installed()  # resolved now, when the model is configured, not in the first forward
        # Set to a dict by Transformer.diagnostics(); then forward runs the eager kernel and stores
        # its internals here. None (the default) costs one attribute check per call.
        self.diagnostics: dict | None = None

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache=None, document_mask=None) -> Tensor:
        """x [B, T, D], cos/sin [T, d] -> [B, T, D]. With a cache, k and v become every cached key and
        value [B, S, h_kv, d], and `cache.mask` ([T, S] or None) says which of them each query reads.
        `document_mask` (documents.py; training only, no cache) keeps each query inside its document."""
        batch, n_tokens, _ = x.shape
        q = self.q_proj(x).view(batch, n_tokens, -1, self.head_dim)  # [B, T, Hq, d]
        k = self.k_proj(x).view(batch, n_tokens, self.n_kv_heads, self.head_dim)  # [B, T, h_kv, d]
        v = self.v_proj(x).view(batch, n_tokens, self.n_kv_heads, self.head_dim)  # [B, T, h_kv, d]
        if self.q_norm is not None:  # before RoPE, per head over d
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask = document_mask
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, S, h_kv, d]
            mask = cache.mask
        if self.diagnostics is not None:
            context = self._diagnose(x, q, k, v, mask)
        else:
            context = self._combine(x, q, k, v, mask)  # [B, T, h, d]
        return self.o_proj(context.reshape(batch, n_tokens, -1))

    def _combine(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        return attend(q, k, v, self.config.attn_backend, mask)

    def _diagnose(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        out, probs, logits = eager_attention(q, k, v, mask)
        self._record(context=out, values=v, logits=logits, probs=probs, effective_probs=probs)
        return out

    def _record(self, **tensors: Tensor) -> None:
        self.diagnostics.update({name: t.detach() for name, t in tensors.items()})

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.o_proj.weight, mean=0.0, std=out_std)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                norm.reset_parameters()


class DiffV2Attention(Attention):
    """DIFF V2: 2h query heads in one ordinary attention call; pair i = heads (2i, 2i+1);
    out_i = o_2i - sigmoid(lambda_i) * o_2i+1 with lambda = lambda_proj(x) per token and head.
    Nothing follows the subtraction (no per-head norm, no (1 - lambda_init))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.lambda_proj = nn.Linear(config.dim, config.n_heads, bias=False)

    def _combine(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        return self._subtract_pairs(attend(q, k, v, self.config.attn_backend, mask), self.lambda_gate(x))

    def lambda_gate(self, x: Tensor) -> Tensor:
        """sigmoid(lambda) [B, T, h]: the weight of each pair's second head."""
        return torch.sigmoid(self.lambda_proj(x))

    @staticmethod
    def _subtract_pairs(out: Tensor, gate: Tensor) -> Tensor:
        # [B, T, 2h, d] -> pairs [B, T, h, 2, d]: heads (2i, 2i+1) become pair i. unbind's backward
        # writes one stacked gradient instead of two zero-filled strided ones.
        first, second = out.unflatten(2, (-1, 2)).unbind(3)
        return first - gate.unsqueeze(-1) * second

    def _diagnose(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        out, probs, logits = eager_attention(q, k, v, mask)
        gate = self.lambda_gate(x)
        context = self._subtract_pairs(out, gate)
        probs_1, probs_2 = probs[:, 0::2], probs[:, 1::2]
        effective = probs_1 - gate.transpose(1, 2).unsqueeze(-1).to(probs.dtype) * probs_2
        self._record(context=context, values=v, logits=logits, probs=probs_1, probs_2=probs_2,
                     effective_probs=effective, lambda_=gate)
        return context

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        super().init_weights(std, out_std)
        # The reference keeps nn.Linear's default init for lambda_proj: sigmoid(lambda) starts near 0.5.
        self.lambda_proj.reset_parameters()


def diffv1_lambda_init(layer_idx: int) -> float:
    """DIFF V1's depth schedule, layer_idx 0-based."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)


class DiffV1Attention(Attention):
    """DIFF V1 (arXiv 2410.05258): h/2 differential heads over h_kv/2 KV heads.

    Query head pair (2i, 2i+1) is (q1, q2) of differential head i, KV pair (2j, 2j+1) is (k1, k2)
    of KV head j, and the value of KV head j is its two d-wide slices side by side (2d). q1 reads
    k1 and q2 reads k2 under GQA (the reference flash path). A = softmax(q1 k1) - lambda softmax(q2 k2),
    then a per-head RMSNorm over 2d and a (1 - lambda_init) factor.
    """

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        self.lambda_init = diffv1_lambda_init(layer_idx)
        self.lambda_q1 = nn.Parameter(torch.empty(config.head_dim))
        self.lambda_k1 = nn.Parameter(torch.empty(config.head_dim))
        self.lambda_q2 = nn.Parameter(torch.empty(config.head_dim))
        self.lambda_k2 = nn.Parameter(torch.empty(config.head_dim))
        self.subln = RMSNorm(2 * config.head_dim, eps=config.norm_eps)

    def lambda_full(self) -> Tensor:
        """The scalar lambda, computed in at least fp32 from the products on: the vectors are upcast before
        the dot product, since bf16 products and a bf16 sum are off by ~0.4% before exp amplifies it."""
        dtype = at_least_fp32(self.lambda_q1.dtype)
        q1, k1, q2, k2 = (v.to(dtype) for v in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2))
        # mul + sum rather than dot/matmul, which autocast would run in bf16 again.
        return torch.exp((q1 * k1).sum()) - torch.exp((q2 * k2).sum()) + self.lambda_init

    def _split(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, ...]:
        batch, n_keys = v.shape[:2]
        wide_v = v.reshape(batch, n_keys, self.n_kv_heads // 2, 2 * self.head_dim)
        return q[:, :, 0::2], q[:, :, 1::2], k[:, :, 0::2], k[:, :, 1::2], wide_v

    def _finish(self, out_1: Tensor, out_2: Tensor) -> Tensor:
        diff = out_1 - self.lambda_full().to(out_1.dtype) * out_2
        return self.subln(diff) * (1.0 - self.lambda_init)

    def _combine(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        q1, q2, k1, k2, wide_v = self._split(q, k, v)
        backend = self.config.attn_backend
        return self._finish(attend(q1, k1, wide_v, backend, mask), attend(q2, k2, wide_v, backend, mask))

    def _diagnose(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        q1, q2, k1, k2, wide_v = self._split(q, k, v)
        out_1, probs_1, logits_1 = eager_attention(q1, k1, wide_v, mask)
        out_2, probs_2, logits_2 = eager_attention(q2, k2, wide_v, mask)
        lam = self.lambda_full()
        diff = out_1 - lam.to(out_1.dtype) * out_2
        # Context RMS is read after the subtraction and before the per-head norm (the norm would
        # pin it to its weight and hide whether the head can output nothing).
        self._record(context=diff, values=wide_v, logits=torch.cat([logits_1, logits_2], dim=1),
                     probs=probs_1, probs_2=probs_2, effective_probs=probs_1 - lam.to(probs_1.dtype) * probs_2,
                     lambda_=lam)
        return self.subln(diff) * (1.0 - self.lambda_init)

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        super().init_weights(std, out_std)
        for vector in (self.lambda_q1, self.lambda_k1, self.lambda_q2, self.lambda_k2):
            nn.init.normal_(vector, mean=0.0, std=0.1)
        self.subln.reset_parameters()


ATTENTION_REGISTRY: dict[str, type[Attention]] = {
    "baseline": Attention,
    "diffv2": DiffV2Attention,
    "diffv1": DiffV1Attention,
}


def build_attention(config: ModelConfig, layer_idx: int) -> Attention:
    return ATTENTION_REGISTRY[config.attention](config, layer_idx)
