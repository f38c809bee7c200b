"""KV caches, a capturable decode step, and token sampling.

Shape legend: B batch, T tokens of this call, S cache slots, h_kv KV heads, d head dim, V vocabulary.

The caches store keys and values exactly as k_proj / v_proj produce them: h_kv heads of width d for
every variant. DIFF V2 doubles only the query heads, so its cache is the baseline's size (the
write-up's decoding claim); DIFF V1 also fits in h_kv * d per token, but reads it twice per step.

Two caches with one interface (`length`, `update`, `mask`, `advance`):
- `KVCache` hands attention the filled part of its buffers; shapes grow by one token per step.
- `StaticKVCache` hands over all S slots and a [T, S] mask of the filled ones, and keeps its position in
  a device tensor, so a decode step has the same shapes, addresses and no host values every time: the
  step can be captured once and replayed (torch.compile, CUDA graphs on GPUs). The compiled steps and the
  static caches they replay over are kept outside the model, in `diffv2_lit/inference/decoding.py`.

`GrowingCache` is how `Transformer.stream` decodes unless handed a decoder from there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from diffv2_lit.model.config import ModelConfig


class KVCache:
    """Preallocated per-layer keys and values, [B, max_len, h_kv, d] each.

    With `dtype=None` the buffers are allocated at the first `update`, in the dtype and on the device of
    the keys the model computes: that is the compute dtype, whichever way it is set (FSDP2's
    MixedPrecisionPolicy casts bf16 copies of fp32 master weights inside forward; autocast casts the
    projections), while the weights seen from outside may be fp32. A cache in the weights' dtype would
    hand fp32 keys to bf16 queries.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.keys: list[Tensor | None] = [None] * config.n_layers
        self.values: list[Tensor | None] = [None] * config.n_layers
        if dtype is not None:
            for layer_idx in range(config.n_layers):
                self._allocate(layer_idx, dtype, device)
        self.max_len = max_len
        self.length = 0  # tokens already cached; the model advances it after each forward
        self.mask: Tensor | None = None  # attention aligns the queries to the last keys (kernels' default)

    def _allocate(self, layer_idx: int, dtype: torch.dtype, device: torch.device | None) -> None:
        self.keys[layer_idx] = torch.zeros(self.shape, dtype=dtype, device=device)
        self.values[layer_idx] = torch.zeros(self.shape, dtype=dtype, device=device)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this call's k, v [B, T, h_kv, d] and return everything cached so far, [B, S, h_kv, d]."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this call would reach {end}.")
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, k.dtype, k.device)
        self.keys[layer_idx][:, self.length:end] = k
        self.values[layer_idx][:, self.length:end] = v
        return self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end]

    def begin(self, n_tokens: int) -> None:
        """Called by the model before a forward of `n_tokens` tokens (nothing to prepare here)."""

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * element


class StaticKVCache:
    """Keys and values in fixed [B, S, h_kv, d] buffers, the position in a 0-d device tensor.

    `length` is that tensor; `update` writes this call's keys at positions length .. length+T-1 with
    `index_copy_` and returns the whole buffers; `mask` [T, S] lets query i read slots 0 .. length+i.
    Buffers are allocated at the first update, in the keys' dtype (see KVCache), and marked as static
    addresses so a compiled step may write into them.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | None = None) -> None:
        if max_len > config.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context of {config.max_seq_len} tokens.")
        self.shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.keys: list[Tensor | None] = [None] * config.n_layers
        self.values: list[Tensor | None] = [None] * config.n_layers
        self.max_len = max_len
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.mask: Tensor | None = None
        self._offsets: Tensor | None = None
        _mark_static(self.length)

    def begin(self, n_tokens: int) -> None:
        self._offsets = self.length + torch.arange(n_tokens, device=self.length.device)  # [T] positions
        self.mask = self.slots[None, :] <= self._offsets[:, None]  # [T, S]

    def reset(self) -> None:
        """Empty again, in place: the buffers keep their addresses (a captured step wrote into them)."""
        self.length.zero_()
        for buffer in self.keys + self.values:
            if buffer is not None:
                buffer.zero_()

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer_idx] is None or self.keys[layer_idx].dtype != k.dtype:  # first use, or a new dtype
            self.keys[layer_idx] = _mark_static(torch.zeros(self.shape, dtype=k.dtype, device=k.device))
            self.values[layer_idx] = _mark_static(torch.zeros(self.shape, dtype=v.dtype, device=v.device))
        self.keys[layer_idx].index_copy_(1, self._offsets, k)
        self.values[layer_idx].index_copy_(1, self._offsets, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n_tokens: int) -> None:
        self.length.add_(n_tokens)


def _mark_static(tensor: Tensor) -> Tensor:
    """Tell torch.compile this tensor keeps its address, so a captured CUDA graph may mutate it in place."""
    torch._dynamo.mark_static_address(tensor)
    return tensor


class GrowingCache:
    """How a model decodes unless it is handed another decoder: a new `KVCache` per call, grown by one token per
    step, and every step the model's own forward. `diffv2_lit.inference.decoding.Decoder` has the same three
    methods for static caches and compiled steps (kept outside the model)."""

    mode = "eager"

    def new_cache(self, config: ModelConfig, batch_size: int, n_tokens: int, device: torch.device) -> KVCache:
        return KVCache(config, batch_size, n_tokens, None, device)

    def logits(self, model: Callable[[Tensor, KVCache], Tensor], tokens: Tensor, cache: KVCache) -> Tensor:
        """One decode step: tokens [B, 1] -> logits [B, V] of the last position."""
        return model(tokens, cache)[:, -1]

    def release(self, cache: KVCache) -> None:
        """Nothing is kept between calls."""


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least the top one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before a token reaches top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
