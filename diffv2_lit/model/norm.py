"""RMSNorm, and the dtype rule shared by every reduction in the model.

Shape legend: any leading dims, D the normalised (last) dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    """fp16/bf16 -> fp32 for reductions; fp32 and fp64 stay as they are (tests run in fp64)."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class RMSNorm(nn.Module):
    """RMSNorm as HF Llama computes it (in fp32, cast back, then scaled), so exported logits match."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(at_least_fp32(x.dtype))
        normed = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
