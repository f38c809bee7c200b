"""Plain PyTorch model code: no Lightning, no torch.distributed."""

from diffv2_lit.model.attention import ATTENTION_REGISTRY, Attention, DiffV1Attention, DiffV2Attention
from diffv2_lit.model.config import PRESETS, Architecture, ConfigError, ModelConfig, resolve_model_config
from diffv2_lit.model.generation import GrowingCache, KVCache, StaticKVCache, sample_next_token
from diffv2_lit.model.params import count_parameters
from diffv2_lit.model.transformer import Transformer

__all__ = [
    "ATTENTION_REGISTRY", "Architecture", "Attention", "ConfigError", "DiffV1Attention", "DiffV2Attention", "GrowingCache", "KVCache",
    "ModelConfig", "PRESETS", "StaticKVCache", "Transformer", "count_parameters", "resolve_model_config", "sample_next_token",
]
