import math

import pytest
import torch

from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.training.optim import decay_parameter_names, lr_multiplier, parameter_groups


def _meta_model(**overrides) -> Transformer:
    config = ModelConfig(n_layers=1, dim=64, n_heads=2, n_kv_heads=2, head_dim=32, vocab_size=64, **overrides)
    with torch.device("meta"):
        return Transformer(config)


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_only_linear_matrices_decay(attention):
    model = _meta_model(attention=attention)
    decay = decay_parameter_names(model)
    linears = ["q_proj", "k_proj", "v_proj", "o_proj"]
    expected = {f"layers.0.self_attn.{name}.weight" for name in linears}
    expected |= {f"layers.0.mlp.{name}.weight" for name in ("gate_proj", "up_proj", "down_proj")}
    expected.add("lm_head.weight")
    assert decay == expected
    names = {name for name, _ in model.named_parameters()}
    no_decay = names - decay
    assert "embed_tokens.weight" in no_decay and "norm.weight" in no_decay
    assert "layers.0.input_layernorm.weight" in no_decay
    if attention == "diffv2":
        assert "layers.0.self_attn.lambda_proj.weight" in no_decay
    if attention == "diffv1":
        assert {"layers.0.self_attn.lambda_q1", "layers.0.self_attn.subln.weight"} <= no_decay


def test_tied_embeddings_are_not_decayed():
    model = _meta_model(tie_embeddings=True)
    groups = parameter_groups(model, weight_decay=0.1)
    assert "embed_tokens.weight" in groups[1]["names"] and groups[1]["weight_decay"] == 0.0
    assert "lm_head.weight" not in groups[0]["names"] and groups[0]["weight_decay"] == 0.1
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(model.parameters()))


def test_cosine_and_wsd_schedules():
    cosine = [lr_multiplier(s, "cosine", 100, 10, 0.1, 0.2) for s in range(120)]
    assert cosine[0] == pytest.approx(0.1) and cosine[9] == pytest.approx(1.0)
    assert cosine[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert cosine[100] == pytest.approx(0.1) and cosine[119] == pytest.approx(0.1)
    wsd = [lr_multiplier(s, "wsd", 100, 10, 0.0, 0.2) for s in range(101)]
    assert wsd[10] == wsd[79] == 1.0
    assert wsd[90] == pytest.approx(0.5) and wsd[100] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(wsd[10:], wsd[11:]))
