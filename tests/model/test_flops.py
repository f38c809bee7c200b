"""FLOPs per token against an independent count: torch's FlopCounterMode over a real forward and backward.

The eager attention backend multiplies Q K^T and A V as full T x T matmuls (no halving for the causal mask, the
convention flops.py follows), so every matmul of the step, the attention core included, is one torch counts.
"""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.model.flops import training_flops_per_token

BATCH = 2


def counted_training_flops(config: ModelConfig, seq_len: int) -> int:
    """FLOPs torch counts in one forward + backward of the plain loss on BATCH x seq_len tokens."""
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    ids = torch.randint(0, config.vocab_size, (BATCH, seq_len + 1))
    with FlopCounterMode(display=False) as counter:
        model(ids[:, :-1], targets=ids[:, 1:], loss_impl="plain").backward()
    return counter.get_total_flops()


def small(attention: str, tie: bool = False) -> ModelConfig:
    return ModelConfig(vocab_size=96, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, ffn_hidden_dim=128,
                       max_seq_len=64, attention=attention, attn_backend="eager", tie_embeddings=tie)


DIFFV1_OVERCOUNT = ("flops.py counts every attention parameter at 6 FLOPs per token, DIFF V1's lambda vectors and "
                    "sub-layer norm weights too (not matmul weights): +0.2% at this shape, ~1e-4 at 125m")


DIFFV1 = pytest.param("diffv1", False, 16, marks=pytest.mark.xfail(strict=True, reason=DIFFV1_OVERCOUNT))


# Two lengths: the attention core's T-dependent part as well; a tied head still multiplies.
@pytest.mark.parametrize("attention, tie, seq_len", [
    ("baseline", False, 16), ("baseline", False, 48), ("baseline", True, 16),
    ("diffv2", False, 16), ("diffv2", False, 48), DIFFV1])
def test_training_flops_per_token_are_what_torch_counts_in_a_step(attention, tie, seq_len):
    config = small(attention, tie)
    assert training_flops_per_token(config, seq_len) * BATCH * seq_len == counted_training_flops(config, seq_len)


def test_diffv1_flops_per_token_are_within_a_percent_of_torchs_count():
    config = small("diffv1")
    assert training_flops_per_token(config, 48) * BATCH * 48 == pytest.approx(counted_training_flops(config, 48),
                                                                             rel=1e-2)
