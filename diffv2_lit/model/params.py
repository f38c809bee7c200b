"""Parameter counts by part, from a model built on the meta device (no memory allocated)."""

from __future__ import annotations

import torch

from diffv2_lit.model.config import ModelConfig
from diffv2_lit.model.transformer import Transformer


def count_parameters(config: ModelConfig) -> dict[str, int]:
    """{"embedding", "attention", "mlp", "norm", "lm_head", "total"} -> number of parameters."""
    with torch.device("meta"):
        model = Transformer(config)
    counts = {"embedding": 0, "attention": 0, "mlp": 0, "norm": 0, "lm_head": 0}
    for name, param in model.named_parameters():
        counts[_parameter_group(name)] += param.numel()
    counts["total"] = sum(counts.values())
    return counts


def _parameter_group(name: str) -> str:
    if name.startswith("embed_tokens"):
        return "embedding"
    if name.startswith("lm_head"):
        return "lm_head"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    return "norm"
