"""FLOPs per token: the attention core per variant, and the matmul part equal to 6 x matmul weights."""

from diffv2_lit.model import ModelConfig, count_parameters
from diffv2_lit.model.flops import block_training_flops_per_token, training_flops_per_token


def _attention_core(config, seq_len):
    counts = count_parameters(config)
    matmul = counts["attention"] + counts["mlp"] + config.vocab_size * config.dim  # tied head still multiplies
    return training_flops_per_token(config, seq_len) - 6 * matmul


def test_attention_core_flops_per_variant():
    config = ModelConfig.from_preset("125m", attention="baseline")  # tied embeddings
    seq = 2048
    base = _attention_core(config, seq)
    assert base == 12 * 12 * seq * 12 * 64  # 12 L T h d
    assert _attention_core(config.replace(attention="diffv2"), seq) == 2 * base  # doubled query heads
    assert _attention_core(config.replace(attention="diffv1"), seq) == 1.5 * base  # 2d-wide values


def test_model_flops_are_layers_times_block_plus_head():
    config = ModelConfig.from_preset("350m", attention="diffv2")
    head = 6 * config.vocab_size * config.dim
    block = block_training_flops_per_token(config, 1024)
    assert training_flops_per_token(config, 1024) == config.n_layers * block + head
