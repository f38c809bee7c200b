"""KV cache and token sampling.

Shape legend: B batch, S cached tokens, h_kv KV heads, d head dim, V vocabulary.

The cache stores keys and values exactly as k_proj / v_proj produce them: h_kv heads of width d for
every variant. DIFF V2 doubles only the query heads, so its cache is the baseline's size (the
write-up's decoding claim); DIFF V1 also fits in h_kv * d per token, but reads it twice per step.
"""

from __future__ import annotations

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

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * element


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
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative - torch.softmax(sorted_logits, dim=-1) >= top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
