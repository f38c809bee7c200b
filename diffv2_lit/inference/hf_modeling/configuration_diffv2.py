"""Hugging Face config for diffv2-lit DIFF Transformer exports (copied into every exported folder).

Self-contained: depends on `transformers` only, never on diffv2_lit. The field names are Llama's, plus
`attention_variant` ("diffv2", "diffv1" or "baseline"). Loaded with
`AutoConfig.from_pretrained(folder, trust_remote_code=True)`.
"""

from transformers import PretrainedConfig

ATTENTION_VARIANTS = ("baseline", "diffv2", "diffv1")


class DiffV2LitConfig(PretrainedConfig):
    model_type = "diffv2_lit"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size: int = 320,
        hidden_size: int = 256,
        intermediate_size: int = 768,
        num_hidden_layers: int = 6,
        num_attention_heads: int = 4,
        num_key_value_heads: int = 2,
        head_dim: int = 64,
        max_position_embeddings: int = 512,
        rope_theta: float = 10000.0,
        rms_norm_eps: float = 1e-5,
        initializer_range: float = 0.02,
        attention_variant: str = "diffv2",
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        qk_norm: bool = False,
        **kwargs,
    ):
        if attention_variant not in ATTENTION_VARIANTS:
            raise ValueError(f"attention_variant={attention_variant!r}; expected one of {ATTENTION_VARIANTS}.")
        if num_attention_heads % num_key_value_heads:
            raise ValueError(f"num_attention_heads={num_attention_heads} must be a multiple of "
                             f"num_key_value_heads={num_key_value_heads}.")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.head_dim = head_dim
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = rope_theta
        self.rms_norm_eps = rms_norm_eps
        self.initializer_range = initializer_range
        self.attention_variant = attention_variant
        self.use_cache = use_cache
        self.qk_norm = qk_norm  # RMSNorm per head on q and k before RoPE (absent in older folders: off)
        self.hidden_act = "silu"
        # transformers >= 5 may move rope_theta into rope_parameters; keep both readable.
        kwargs.setdefault("rope_parameters", {"rope_type": "default", "rope_theta": rope_theta})
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
