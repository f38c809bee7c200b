"""Model configuration and named presets (parameter counts: params.py).

Notation (docs/design.md section 1): `dim` = D model width, `n_heads` = h output heads,
`n_kv_heads` = h_kv key/value heads, `head_dim` = d.

For every attention variant `n_heads` counts the heads that reach `o_proj`, so baseline, DIFF V2
and DIFF V1 built from one config have identical `o_proj` shapes:
- baseline: h query heads;
- diffv2:   2h query heads, subtracted pairwise down to h;
- diffv1:   h/2 differential heads, each with two d-dim queries/keys and a 2d-dim value.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass
from typing import Literal

from diffv2_lit.errors import EXIT_USAGE, DiffV2Error

ATTENTION_VARIANTS = ("baseline", "diffv2", "diffv1")
# Where a recipe holds the ModelConfig (`model:` is DecoderLM, `architecture:` its argument), for messages
# that name the key to fix: `model.architecture.attention`, `model.architecture.n_kv_heads`, ...
CONFIG_PATH = "model.architecture"
ATTENTION_BACKENDS = ("auto", "flash", "sdpa", "eager")

AttentionVariant = Literal["baseline", "diffv2", "diffv1"]
AttentionBackend = Literal["auto", "flash", "sdpa", "eager"]


def flash_attn_available() -> bool:
    """The one availability check for the optional flash-attn kernel (never imported at top level)."""
    return importlib.util.find_spec("flash_attn") is not None


def swiglu_hidden_dim(dim: int, multiple_of: int = 256) -> int:
    """Llama's SwiGLU width: about 8/3 * dim, rounded up to a multiple of `multiple_of`."""
    hidden = int(8 * dim / 3)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


class ConfigError(DiffV2Error, ValueError):
    """A model configuration that cannot work; the message names the field, the value and the fix."""

    exit_code = EXIT_USAGE


@dataclass
class ModelConfig:
    vocab_size: int = 320
    n_layers: int = 4
    dim: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None  # None: dim // n_heads (32 here)
    ffn_hidden_dim: int | None = None  # None: swiglu_hidden_dim(dim)
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: AttentionVariant = "diffv2"
    attn_backend: AttentionBackend = "auto"
    # RMSNorm over each head's d dims of q and of k, before RoPE (Qwen3's layout: one weight of size head_dim
    # for q and one for k, shared by every head; OLMo-2 instead norms the whole h*d projection). Off by default,
    # so checkpoints saved before the key existed load unchanged.
    qk_norm: bool = False

    def __post_init__(self) -> None:
        # The derived fields (ffn_hidden_dim here, head_dim in _check_heads) are computed from the fields as
        # given; from_preset builds preset + overrides in this one call, so they follow every override.
        for name in ("vocab_size", "n_layers", "dim", "n_heads", "n_kv_heads", "max_seq_len"):
            _require_positive_int(name, getattr(self, name))
        if self.ffn_hidden_dim is None:
            self.ffn_hidden_dim = swiglu_hidden_dim(self.dim)
        _require_positive_int("ffn_hidden_dim", self.ffn_hidden_dim)
        if self.head_dim is not None:
            _require_positive_int("head_dim", self.head_dim)
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive number.")
        if not isinstance(self.qk_norm, bool):
            raise ConfigError(f"qk_norm={self.qk_norm!r} must be true or false ({CONFIG_PATH}.qk_norm).")
        if self.attention not in ATTENTION_VARIANTS:
            raise ConfigError(f"attention={self.attention!r} is unknown; choose one of {ATTENTION_VARIANTS}.")
        if self.attn_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attn_backend={self.attn_backend!r} is unknown; choose one of {ATTENTION_BACKENDS}.")
        self._check_heads()
        if self.attn_backend == "flash" and not flash_attn_available():
            raise ConfigError(
                "attn_backend='flash' but flash-attn is not installed; install it on a CUDA machine with "
                "`pip install 'diffv2-lit[flash]'`, or use attn_backend='auto' (flash when available, else SDPA)."
            )

    def _check_heads(self) -> None:
        if self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}: every query head must "
                f"map to one KV head (and DIFF V2's paired heads must share one). Choose n_kv_heads among the "
                f"divisors of {self.n_heads}: {_divisors(self.n_heads)}."
            )
        if self.attention == "diffv1" and (self.n_heads % 2 or self.n_kv_heads % 2):
            raise ConfigError(
                f"attention='diffv1' halves the heads (h/2 differential heads over h_kv/2 KV heads), so n_heads="
                f"{self.n_heads} and n_kv_heads={self.n_kv_heads} must both be even; e.g. n_kv_heads="
                f"{self.n_kv_heads + self.n_kv_heads % 2} or an even n_heads."
            )
        if self.head_dim is None:
            self.head_dim = self._derived_head_dim()
        if self.head_dim % 2 != 0:
            raise ConfigError(f"head_dim={self.head_dim} must be even for rotary embeddings (rotate-half pairs).")

    def _derived_head_dim(self) -> int:
        if self.dim % self.n_heads != 0:
            raise ConfigError(
                f"dim={self.dim} is not a multiple of n_heads={self.n_heads}, so head_dim (dim // n_heads unless "
                f"given) is not whole; set n_heads to a divisor of {self.dim} (e.g. "
                f"{_nearest_divisor(self.dim, self.n_heads)}) or give head_dim."
            )
        return self.dim // self.n_heads

    @property
    def n_query_heads(self) -> int:
        """Query heads the attention kernel sees."""
        return {"baseline": self.n_heads, "diffv2": 2 * self.n_heads, "diffv1": self.n_heads}[self.attention]

    def replace(self, **changes) -> "ModelConfig":
        """This config with `changes`, every other field as it is. A built config no longer knows which fields
        were derived, so a new `dim` or `n_heads` must come with the head_dim / ffn_hidden_dim it implies (or
        go through `from_preset(name, **fields)`, which derives them): refused otherwise, never kept stale."""
        stale = [name for name, inputs in _DERIVED_FROM.items()
                 if name not in changes and any(changes.get(k, getattr(self, k)) != getattr(self, k) for k in inputs)]
        if stale:
            raise ConfigError(
                f"replace({', '.join(f'{k}={v!r}' for k, v in changes.items())}) would keep "
                f"{', '.join(f'{name}={getattr(self, name)}' for name in stale)} of the old shape; pass "
                f"{' and '.join(stale)} too, or use ModelConfig.from_preset(preset, ...) to derive them."
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        """The preset's given fields with `overrides` on top, built once: the fields a preset leaves out
        (`head_dim` = dim // n_heads, `ffn_hidden_dim` = swiglu_hidden_dim(dim)) follow the overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; available presets: {sorted(PRESETS)}.")
        return cls(**{**PRESETS[name], **overrides})


# Derived field -> the fields it is computed from when not given (head_dim: dim // n_heads; ffn_hidden_dim:
# swiglu_hidden_dim(dim)).
_DERIVED_FROM = {"head_dim": ("dim", "n_heads"), "ffn_hidden_dim": ("dim",)}


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a positive integer.")


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def _nearest_divisor(n: int, near: int) -> int:
    return min(_divisors(n), key=lambda k: (abs(k - near), -k))


def _gpt3_shape(n_layers: int, dim: int, n_heads: int, n_kv_heads: int, **extra) -> dict:
    """GPT-3 family shapes with Llama parts; vocab padded to a multiple of 64 (GPT-2 BPE: 50257 -> 50304).
    head_dim and ffn_hidden_dim are left out unless given, so they are derived from the final dim/n_heads."""
    return dict(vocab_size=50304, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads,
                max_seq_len=2048, **extra)


# Sizes from docs/design.md section 3 (GQA variants of the GPT-3 table). All default to DIFF V2; pass
# attention="baseline" / "diffv1" to get the twins. Each preset is the dict of the fields it gives, never a
# built ModelConfig: from_preset builds preset + overrides in one go, so derived fields follow the overrides.
PRESETS: dict[str, dict] = {
    # The dataclass defaults: 4 x 128, 4 heads of 32 over 2 KV heads, 1.13M parameters as DIFF V2 (1.07M as
    # baseline; count_parameters, the README's table), with the byte tokenizer (259 ids, padded to 320): the
    # README's CPU quickstart trains it 1200 steps of 16 x 128 tokens in about 3.5 minutes on 2 cores.
    "quickstart": {},
    # GPT-3 ties embeddings; we tie them where they are a large share of the model (125m, 350m) and
    # untie them above, as Llama does. Either way the totals land within 10% of the names.
    "125m": _gpt3_shape(12, 768, 12, 4, tie_embeddings=True),
    "350m": _gpt3_shape(24, 1024, 16, 4, tie_embeddings=True),
    "760m": _gpt3_shape(24, 1536, 16, 4),
    "1.3b": _gpt3_shape(24, 2048, 16, 4),
    "2.7b": _gpt3_shape(32, 2560, 32, 8),
    "6.7b": _gpt3_shape(32, 4096, 32, 8),
    # The write-up's parameter-matched control (ablation 4): a baseline with 1.5h query heads has the
    # attention parameters (3 + 2r) D^2 of DIFF V2 with h heads. 18 query heads cannot share 4 KV heads,
    # so the 125m control uses 6 (+2.4M parameters, +1.9%); 24 heads over 4 KV heads match 1.3b exactly.
    "quickstart-control": dict(n_heads=6, head_dim=32, attention="baseline"),
    "125m-control": _gpt3_shape(12, 768, 18, 6, head_dim=64, tie_embeddings=True,
                                attention="baseline"),
    "1.3b-control": _gpt3_shape(24, 2048, 24, 4, head_dim=128, attention="baseline"),
}


# ---- what a recipe writes: a preset plus any field ------------------------------------------------


def _architecture_fields() -> list[tuple]:
    """`preset`, then every ModelConfig field as optional (None: the preset's value, or for a field the preset
    leaves out, the value derived from the others). Derived from
    ModelConfig, so a new field needs no second declaration."""
    hints = typing.get_type_hints(ModelConfig)
    fields = [("preset", str, dataclasses.field(default="quickstart"))]
    for field in dataclasses.fields(ModelConfig):
        fields.append((field.name, typing.Optional[hints[field.name]], dataclasses.field(default=None)))
    return fields


def _build(self) -> ModelConfig:
    overrides = {k: v for k, v in dataclasses.asdict(self).items() if k != "preset" and v is not None}
    return ModelConfig.from_preset(self.preset, **overrides)


Architecture = dataclasses.make_dataclass("Architecture", _architecture_fields(), namespace={"build": _build})
Architecture.__module__ = __name__
Architecture.__doc__ = ("A preset name plus overrides of any ModelConfig field, as recipes write it under "
                        f"`{CONFIG_PATH}` (for example `{{preset: 125m, attention: baseline}}`).")


def resolve_model_config(spec: "Architecture | ModelConfig | dict | str") -> ModelConfig:
    """A preset name, an Architecture, a ModelConfig, or a dict of either's fields -> ModelConfig."""
    if isinstance(spec, ModelConfig):
        return spec
    if isinstance(spec, str):
        return ModelConfig.from_preset(spec)
    if isinstance(spec, dict):
        return resolve_model_config(Architecture(**spec) if "preset" in spec else ModelConfig(**spec))
    return spec.build()
