"""Training FLOPs per token, for MFU and for the benchmarks' FLOP ratios.

Counted the PaLM way (Chowdhury et al. 2022, appendix B): every matmul weight costs 6 FLOPs per
token for forward + backward (2 forward, 4 backward), and the attention core (QK^T and AV) costs
6 * T * (QK width + V width) per token and layer, without halving for the causal mask (the usual
convention, so numbers compare with published MFUs). Embedding lookups are free; the tied or
untied output head is a matmul and counts.

Attention-core widths per token, per layer (h output heads, d head dim):
    baseline  QK h*d,  AV h*d     (h softmax maps)
    diffv2    QK 2h*d, AV 2h*d    (2h maps: the doubled query heads, as a 2h-head Transformer)
    diffv1    QK h*d,  AV 2h*d    (h maps of h/2 differential heads, each reading a 2d-wide value)
"""

from __future__ import annotations

from diffv2_lit.model.config import ModelConfig
from diffv2_lit.model.params import count_parameters


def attention_core_width(config: ModelConfig) -> int:
    """QK width + AV width summed over the softmax maps of one layer."""
    h, d = config.n_heads, config.head_dim
    return {"baseline": 2 * h * d, "diffv2": 4 * h * d, "diffv1": 3 * h * d}[config.attention]


def block_training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of one decoder block for one token of a length-`seq_len` sequence."""
    counts = count_parameters(config.replace(n_layers=1))
    return 6 * (counts["attention"] + counts["mlp"]) + 6 * seq_len * attention_core_width(config)


def training_flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs of the whole model for one token (the number MFU divides by)."""
    head = config.vocab_size * config.dim  # tied or not, the output head multiplies
    return config.n_layers * block_training_flops_per_token(config, seq_len) + 6 * head
