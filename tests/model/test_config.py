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
        assert 1e6 < total < 10e6  # 1.13M (DIFF V2): fast enough for the CPU quickstart


# ---- a preset plus overrides is built once: derived fields follow the overrides (issue 19.1) ------------


def test_widening_125m_to_350m_shape_gives_the_350m_preset():
    """125m with 350m's depth, width and heads is the 350m preset, FFN included (2816 = 11 x 256 >= 8/3 x 1024)."""
    widened = ModelConfig.from_preset("125m", n_layers=24, dim=1024, n_heads=16)
    assert widened == ModelConfig.from_preset("350m")
    assert (widened.ffn_hidden_dim, widened.head_dim) == (2816, 64)


def test_quickstart_at_width_256_has_its_own_ffn_and_head_width():
    config = ModelConfig.from_preset("quickstart", dim=256)
    assert (config.ffn_hidden_dim, config.n_heads, config.head_dim) == (768, 4, 64)
    # By hand, docs/design.md section 1: per layer DIFF V2 attention D*2h*d + 2*D*h_kv*d + h*d*D + D*h
    # = 131072 + 65536 + 65536 + 1024, SwiGLU 3*D*F = 589824, two norms 512; x4 layers, plus untied
    # embedding and head 2 * 320 * 256 and the final norm 256.
    assert count_parameters(config)["total"] == 4 * (263168 + 589824 + 512) + 2 * 320 * 256 + 256 == 3_578_112


def test_recipe_spec_overrides_derive_the_same_way():
    """What a recipe writes (`{preset: quickstart, dim: 256}`) goes through the same single build."""
    from diffv2_lit.model import resolve_model_config

    config = resolve_model_config({"preset": "quickstart", "dim": 256})
    assert config == ModelConfig.from_preset("quickstart", dim=256)
    assert (config.ffn_hidden_dim, config.head_dim) == (768, 64)


def test_given_fields_win_over_derived_ones():
    config = ModelConfig.from_preset("125m", dim=1024, head_dim=64, ffn_hidden_dim=2048)
    assert (config.n_heads, config.head_dim, config.ffn_hidden_dim) == (12, 64, 2048)
    assert ModelConfig.from_preset("125m", dim=1024, head_dim=64).ffn_hidden_dim == 2816
    control = ModelConfig.from_preset("125m-control", n_layers=2)  # 18 heads of 64 is the control's point
    assert (control.n_heads, control.head_dim, control.ffn_hidden_dim) == (18, 64, 2048)
    assert ModelConfig.from_preset("quickstart-control").head_dim == 32  # 6 heads of 32 in a 128-wide model


def test_a_width_the_heads_do_not_divide_names_the_fix():
    """1024 / 12 heads is no whole head width: say so, rather than keep 125m's 64 or invent one."""
    with pytest.raises(ConfigError, match=r"dim=1024 is not a multiple of n_heads=12.*e\.g\. 16\) or give head_dim"):
        ModelConfig.from_preset("125m", dim=1024)


# Every preset's totals as built before presets became dicts of given fields (computed at 6755530 with
# ModelConfig.from_preset(preset, attention=...)): making head_dim / ffn_hidden_dim derived changed no preset.
PRESET_TOTALS_AT_6755530 = {
    "quickstart": (1066112, 1133696, 1066880), "quickstart-control": (1131648, 1233024, 1132416),
    "125m": (114150144, 121338624, 114154752), "125m-control": (123587328, 134370048, 123591936),
    "350m": (322094080, 347653120, 322103296), "760m": (749151744, 806364672, 749165568),
    "1.3b": (1288275968, 1389725696, 1288294400), "1.3b-control": (1388939264, 1541113856, 1388957696),
    "2.7b": (2480704000, 2693040640, 2480719360), "6.7b": (6083055616, 6624120832, 6083080192),
}
SHAPES_AT_6755530 = {  # (head_dim, ffn_hidden_dim)
    "quickstart": (32, 512), "quickstart-control": (32, 512), "125m": (64, 2048), "125m-control": (64, 2048),
    "350m": (64, 2816), "760m": (96, 4096), "1.3b": (128, 5632), "1.3b-control": (128, 5632), "2.7b": (80, 6912),
    "6.7b": (128, 11008),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_is_the_model_it_was(preset):
    assert set(PRESET_TOTALS_AT_6755530) == set(PRESETS)
    for attention, total in zip(VARIANTS, PRESET_TOTALS_AT_6755530[preset]):
        config = ModelConfig.from_preset(preset, attention=attention)
        assert (config.head_dim, config.ffn_hidden_dim) == SHAPES_AT_6755530[preset]
        assert count_parameters(config)["total"] == total


def test_replace_refuses_to_keep_derived_fields_of_another_width():
    config = ModelConfig.from_preset("125m")
    with pytest.raises(ConfigError, match=r"replace\(dim=1024\) would keep head_dim=64, ffn_hidden_dim=2048 of the "
                                          r"old shape; pass head_dim and ffn_hidden_dim too, or use "
                                          r"ModelConfig.from_preset"):
        config.replace(dim=1024)
    with pytest.raises(ConfigError, match=r"would keep head_dim=64 of the old shape"):
        config.replace(n_heads=16)
    wider = config.replace(dim=1024, n_heads=16, head_dim=64, ffn_hidden_dim=2816)
    assert wider == ModelConfig.from_preset("125m", dim=1024, n_heads=16)
    assert config.replace(attention="baseline", n_layers=2, dim=768) == ModelConfig.from_preset(
        "125m", attention="baseline", n_layers=2)  # unchanged width: nothing to derive again
