"""Document masking inside packed sequences: per-token document ids and the masks built from them.

`prepare` ends every document with one EOS, so a packed training sequence is several documents side by side.
With document masking each query reads only earlier keys of its own document: document k of a packed
sequence then gets the logits it would get run alone (RoPE scores depend on relative positions only).

    B batch    T tokens (= S keys; document masking is a training-forward feature, not a decoding one)

document_ids [B, T] long: equal ids = same document; ids never decrease along a row (each EOS ends one).
"""

from __future__ import annotations

import torch
from torch import Tensor


def document_ids(tokens: Tensor, eos_id: int) -> Tensor:
    """[..., T] tokens -> [..., T] document ids: 0 up to and including the first EOS, 1 after it, ...
    The EOS belongs to the document it ends; the token after it starts the next one."""
    ends = (tokens == eos_id).long()
    return ends.cumsum(-1) - ends


def document_starts(document_ids: Tensor) -> Tensor:
    """[B, T] -> [B, T] long: the position of the first token of each token's document (its sink key)."""
    positions = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    is_start = torch.ones_like(document_ids, dtype=torch.bool)
    is_start[..., 1:] = document_ids[..., 1:] != document_ids[..., :-1]
    return torch.where(is_start, positions, torch.zeros_like(positions)).cummax(-1).values


def document_mask(document_ids: Tensor) -> Tensor:
    """[B, T] -> [B, 1, T, T] bool, True where query i may read key j: j <= i and the same document.
    The head axis is 1 so that it broadcasts over every kernel's query heads."""
    n_tokens = document_ids.shape[-1]
    causal = torch.ones(n_tokens, n_tokens, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_document & causal)[:, None]


def flex_block_mask(document_ids: Tensor):
    """The same mask as a FlexAttention BlockMask (CUDA): blocks wholly outside every document are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def same_document_causal(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (document_ids[b, q_idx] == document_ids[b, kv_idx])

    batch, n_tokens = document_ids.shape
    return create_block_mask(same_document_causal, batch, None, n_tokens, n_tokens, device=document_ids.device)
