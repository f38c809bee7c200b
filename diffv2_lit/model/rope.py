"""Rotary position embedding in HF Llama's rotate-half convention.

Shape legend: T tokens, d head dim. cos/sin are [T, d]; they broadcast over [B, T, H, d].
They are computed per forward from the positions (a [T, d/2] outer product, negligible next to a
block), so the model holds no buffer that meta-device construction would leave uninitialised.
"""

from __future__ import annotations

import torch
from torch import Tensor


def rope_cos_sin(positions: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, d/2]
    angles = torch.cat([freqs, freqs], dim=-1)  # [T, d]: rotate-half pairs channel c with c + d/2
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [B, T, H, d]; cos, sin [T, d]. The result keeps x's dtype.

    Under autocast the hidden states (hence cos/sin) are fp32 while the projections are bf16: mixing them
    would promote q and k to fp32 beside a bf16 v, which rules out flash-attn and saves fp32 copies of
    the 2h query heads for backward. So cos/sin are cast to x's dtype, as HF Llama does.
    """
    cos, sin = cos[:, None, :].to(x.dtype), sin[:, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin
