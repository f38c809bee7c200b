"""The mapping between our model and the Hugging Face folder layout (config.json + model.safetensors).

Our module names already follow HF Llama, so a state dict maps by prefixing `model.` to every key but
`lm_head.weight`. The baseline is written as `LlamaForCausalLM` (model_type "llama", no custom code);
DIFF V2 / V1 as our own `DiffV2LitForCausalLM` (hf_modeling/, loaded with trust_remote_code=True) with
the same Llama field names, so tools that read `max_position_embeddings` or `hidden_size` keep working.

config.json also carries a `diffv2_lit` block (the full ModelConfig, the tokenizer spec and the sequence
length the model was trained at) so that importing an export back gives exactly the config it came from
and `generate` can warn past the training length; without that block (a Llama folder from elsewhere),
the config is rebuilt from the Llama fields.
"""

from __future__ import annotations

import dataclasses

import torch

from diffv2_lit.model import ModelConfig

FORMAT_VERSION = 1
REMOTE_MODEL_TYPE = "diffv2_lit"
REMOTE_ARCHITECTURE = "DiffV2LitForCausalLM"
AUTO_MAP = {
    "AutoConfig": "configuration_diffv2.DiffV2LitConfig",
    "AutoModelForCausalLM": "modeling_diffv2.DiffV2LitForCausalLM",
}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def hf_config(config: ModelConfig, dtype: torch.dtype, special_ids: dict, tokenizer_spec: str | None,
              train_seq_len: int | None = None) -> dict:
    """config.json contents: Llama fields, plus auto_map and the variant for DIFF models."""
    fields = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        # transformers >= 5 reads rope_parameters; older versions read the top-level rope_theta.
        "rope_theta": config.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "use_cache": True,
        "dtype": DTYPE_NAMES[dtype],
        "torch_dtype": DTYPE_NAMES[dtype],
        **special_ids,
    }
    if config.attention == "baseline" and config.qk_norm:
        # Qwen3 is Llama plus q_norm/k_norm (RMSNorm per head over head_dim, before RoPE), with our key names.
        head = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "use_sliding_window": False,
                "sliding_window": None, "max_window_layers": config.n_layers,
                "layer_types": ["full_attention"] * config.n_layers}
    elif config.attention == "baseline":
        head = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    else:
        head = {"architectures": [REMOTE_ARCHITECTURE], "model_type": REMOTE_MODEL_TYPE, "auto_map": AUTO_MAP,
                "attention_variant": config.attention, "qk_norm": config.qk_norm}
    ours = {"format_version": FORMAT_VERSION, "model_config": dataclasses.asdict(config), "tokenizer": tokenizer_spec,
            "train_seq_len": train_seq_len}
    return {**head, **fields, "diffv2_lit": ours}


def train_seq_len_from_hf(hf: dict) -> int | None:
    """The training sequence length an export recorded (None for older exports and foreign folders)."""
    return positive_int_or_none((hf.get("diffv2_lit") or {}).get("train_seq_len"))


def positive_int_or_none(value) -> int | None:
    """`value` if it is a positive int (not a bool), else None: for lengths read from files we did not write."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def model_config_fields_from_hf(hf: dict) -> dict:
    """ModelConfig fields of an exported folder: the exact ones if we wrote it, else rebuilt from Llama fields."""
    ours = hf.get("diffv2_lit")
    if ours and "model_config" in ours:
        return dict(ours["model_config"])
    model_type = hf.get("model_type")
    if model_type not in ("llama", "qwen3", REMOTE_MODEL_TYPE):
        raise ValueError(f"config.json has model_type={model_type!r}; only 'llama', 'qwen3' and {REMOTE_MODEL_TYPE!r} "
                         "folders map onto this project's model.")
    rope = hf.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default" or hf.get("rope_scaling"):
        raise ValueError(f"config.json uses RoPE scaling {rope or hf.get('rope_scaling')}; only plain RoPE is supported.")
    n_heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], dim=hf["hidden_size"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        ffn_hidden_dim=hf["intermediate_size"], max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), norm_eps=hf.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf.get("tie_word_embeddings", False), init_std=hf.get("initializer_range", 0.02),
        attention=hf.get("attention_variant", "baseline"), qk_norm=model_type == "qwen3" or hf.get("qk_norm", False),
    )


def to_hf_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our Transformer keys -> HF CausalLM keys (`model.` + ours, `lm_head.weight` unchanged)."""
    return {(key if key.startswith("lm_head.") else f"model.{key}"): value for key, value in state_dict.items()}


def from_hf_keys(state_dict: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of to_hf_keys. A tied model drops a stored `lm_head.weight` (some writers save it)."""
    ours = {key.removeprefix("model."): value for key, value in state_dict.items()}
    if config.tie_embeddings:
        ours.pop("lm_head.weight", None)
    return ours
