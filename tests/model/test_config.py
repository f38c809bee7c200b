"""Config validation and parameter counts against the closed forms of docs/design.md section 1."""

import pytest

from diffv2_lit.model import PRESETS, ConfigError, ModelConfig, count_parameters
from diffv2_lit.model.config import flash_attn_available

VARIANTS = ("baseline", "diffv2", "diffv1")


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"n_heads": 12, "n_kv_heads": 5}, "n_heads=12 is not a multiple of n_kv_heads=5"),
        ({"n_heads": 6, "n_kv_heads": 3, "attention": "diffv1"}, "must both be even"),
        ({"n_heads": 3, "n_kv_heads": 1, "attention": "diffv1"}, "must both be even"),
        ({"head_dim": 0}, "head_dim=0 must be a positive integer"),
        ({"head_dim": 2.5}, "head_dim=2.5 must be a positive integer"),
        ({"head_dim": 33}, "head_dim=33 must be even"),
        ({"vocab_size": -1}, "vocab_size=-1 must be a positive integer"),
        ({"attention": "diff"}, "attention='diff' is unknown"),
        ({"attn_backend": "xformers"}, "attn_backend='xformers' is unknown"),
        ({"norm_eps": 0.0}, "norm_eps=0.0 must be a positive number"),
    ],
)
def test_invalid_config_names_field_value_and_fix(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelConfig(**fields)


def test_head_error_suggests_valid_kv_heads():
    with pytest.raises(ConfigError, match=r"divisors of 12: \[1, 2, 3, 4, 6, 12\]"):
        ModelConfig(n_heads=12, n_kv_heads=5)


@pytest.mark.skipif(flash_attn_available(), reason="flash-attn is installed here")
def test_flash_backend_without_flash_attn_says_how_to_install():
    with pytest.raises(ConfigError, match=r"pip install 'diffv2-lit\[flash\]'"):
        ModelConfig(attn_backend="flash")


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError, match="available presets"):
        ModelConfig.from_preset("42b")


def _attention_closed_form(c: ModelConfig) -> int:
    """Per layer; written from docs/design.md section 1 without looking at the modules."""
    D, h, hkv, d = c.dim, c.n_heads, c.n_kv_heads, c.head_dim
    kv = 2 * D * hkv * d
    if c.attention == "baseline":
        return D * h * d + kv + h * d * D
    if c.attention == "diffv2":
        return D * 2 * h * d + kv + h * d * D + D * h  # doubled q_proj, lambda_proj D -> h
    return D * h * d + kv + h * d * D + 4 * d + 2 * d  # four lambda vectors, per-head norm over 2d


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("attention", VARIANTS)
def test_parameter_counts_match_closed_forms(preset, attention):
    config = ModelConfig.from_preset(preset, attention=attention)  # every preset has even h and h_kv
    counts = count_parameters(config)
    D, L, F, V = config.dim, config.n_layers, config.ffn_hidden_dim, config.vocab_size
    assert counts["attention"] == L * _attention_closed_form(config)
    assert counts["mlp"] == L * 3 * D * F
    assert counts["embedding"] == V * D
    assert counts["lm_head"] == (0 if config.tie_embeddings else V * D)
    assert counts["norm"] == L * 2 * D + D
    assert counts["total"] == sum(v for k, v in counts.items() if k != "total")


@pytest.mark.parametrize("preset", ["125m", "350m", "760m", "1.3b", "2.7b", "6.7b"])
def test_design_ratios_per_layer(preset):
    """Baseline (2+2r)D^2, DIFF V2 (3+2r)D^2 + D h, with r = h_kv / h (all GPT-3 presets have h d = D)."""
    base = ModelConfig.from_preset(preset, attention="baseline")
    D, r, L = base.dim, base.n_kv_heads / base.n_heads, base.n_layers
    assert base.n_heads * base.head_dim == D
    assert count_parameters(base)["attention"] == L * (2 + 2 * r) * D * D
    diff = base.replace(attention="diffv2")
    assert count_parameters(diff)["attention"] == L * ((3 + 2 * r) * D * D + D * base.n_heads)


def test_parameter_matched_control_1p3b_is_exact():
    """Ablation 4: a baseline with 1.5h heads carries DIFF V2's (3+2r)D^2, i.e. all but lambda_proj."""
    diff = count_parameters(ModelConfig.from_preset("1.3b"))
    control_config = ModelConfig.from_preset("1.3b-control")
    control = count_parameters(control_config)
    assert control_config.attention == "baseline" and control_config.n_heads == 24
    D, h, L = 2048, 16, 24
    assert diff["attention"] - control["attention"] == L * D * h


def test_parameter_matched_control_125m_is_within_two_percent():
    diff = count_parameters(ModelConfig.from_preset("125m"))["total"]
    control = count_parameters(ModelConfig.from_preset("125m-control"))["total"]
    assert abs(control - diff) / diff < 0.02


@pytest.mark.parametrize(
    ("preset", "billions"),
    [("125m", 0.125), ("350m", 0.35), ("760m", 0.76), ("1.3b", 1.3), ("2.7b", 2.7), ("6.7b", 6.7)],
)
@pytest.mark.parametrize("attention", ["baseline", "diffv2"])
def test_presets_are_the_size_their_name_claims(preset, billions, attention):
    total = count_parameters(ModelConfig.from_preset(preset, attention=attention))["total"]
    assert abs(total / 1e9 - billions) / billions < 0.1, total


def test_quickstart_has_a_few_million_parameters():
    for attention in VARIANTS:
        total = count_parameters(ModelConfig.from_preset("quickstart", attention=attention))["total"]
        assert 1e6 < total < 10e6  # ~1.5M: fast enough for the 10-minute CPU quickstart
