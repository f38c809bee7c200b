"""Llama-style decoder (RMSNorm pre-norm, RoPE, SwiGLU, no biases) with a pluggable attention variant.

Shape legend
    B batch    T tokens of this call    D model width    V vocabulary    L layers

Module names follow HF Llama (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ..., `norm`, `lm_head`)
so that a baseline state dict maps onto `LlamaForCausalLM` by prefixing `model.` to everything
but `lm_head`. Plain PyTorch: no Lightning, no torch.distributed; parallelism is applied from outside.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffv2_lit.model.attention import build_attention
from diffv2_lit.model.config import ModelConfig
from diffv2_lit.model.documents import document_mask, flex_block_mask
from diffv2_lit.model.generation import GrowingCache, KVCache, sample_next_token
from diffv2_lit.model.loss import linear_cross_entropy
from diffv2_lit.model.norm import RMSNorm
from diffv2_lit.model.rope import rope_cos_sin


class SwiGLU(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.ffn_hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.ffn_hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.ffn_hidden_dim, config.dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    @torch.no_grad()
    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.gate_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.up_proj.weight, mean=0.0, std=std)
        nn.init.normal_(self.down_proj.weight, mean=0.0, std=out_std)


class Block(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)). The unit of activation checkpointing, compile and sharding."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.self_attn = build_attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.dim, eps=config.norm_eps)
        self.mlp = SwiGLU(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                document_mask=None) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, document_mask)
        return h + self.mlp(self.post_attention_layernorm(h))

    def init_weights(self, std: float, out_std: float) -> None:
        self.input_layernorm.reset_parameters()
        self.post_attention_layernorm.reset_parameters()
        self.self_attn.init_weights(std, out_std)
        self.mlp.init_weights(std, out_std)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        # Tied embeddings reuse embed_tokens.weight in forward instead of sharing a Parameter between
        # two modules: a shared Parameter is silently untied by meta-device `to_empty`.
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, targets: Tensor | None = None,
                loss_impl: str = "plain", z_loss: float = 0.0, document_ids: Tensor | None = None) -> Tensor:
        """input_ids [B, T] -> logits [B, T, V]. With a cache, the tokens continue at cache.length.

        With `targets` [B, T] it returns the summed token loss instead (a 0-d fp32 tensor; -100 targets
        count for nothing), the output layer fused with the cross-entropy by `loss_impl` (loss.py) so that
        the [B, T, V] logits need not exist. The loss runs here rather than in the training code because
        a sharding wrapper (FSDP) gathers the output weight for this forward, and must see it used here.

        With `document_ids` [B, T] (documents.py) each query reads only earlier tokens of its own document;
        None (the default) is plain causal attention through the same kernels as ever.
        """
        mask = None if document_ids is None else self._document_mask(document_ids, cache)
        h = self.embed_tokens(input_ids)
        cos, sin = self._rope(input_ids.shape[1], start=cache.length if cache else 0, dtype=h.dtype)
        if cache is not None:
            cache.begin(input_ids.shape[1])
        for block in self.layers:
            h = block(h, cos, sin, cache, mask)
        if cache is not None:
            cache.advance(input_ids.shape[1])
        h = self.norm(h)
        if targets is not None:
            return linear_cross_entropy(h.flatten(0, 1), self.output_weight, targets.flatten(), loss_impl,
                                        z_loss=z_loss)
        return F.linear(h, self.output_weight)

    def _document_mask(self, document_ids: Tensor, cache: KVCache | None):
        """A FlexAttention BlockMask on CUDA (skips the blocks between documents), else the dense [B, 1, T, T]
        bool mask that SDPA and the eager kernel read; dense also under diagnostics, which run eager."""
        if cache is not None:
            raise ValueError("document_ids is a training-forward argument: decode one document at a time, without it.")
        diagnosing = self.layers[0].self_attn.diagnostics is not None
        if document_ids.is_cuda and not diagnosing and self.config.attn_backend != "eager":
            return flex_block_mask(document_ids)
        return document_mask(document_ids)

    @property
    def output_weight(self) -> Tensor:
        """[V, D]: lm_head's weight, or the embedding matrix when the embeddings are tied."""
        return self.lm_head.weight if self.lm_head is not None else self.embed_tokens.weight

    def _rope(self, n_tokens: int, start: int | Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [T, d] for positions start .. start+T-1; `start` is a 0-d tensor for a StaticKVCache
        (whose size was checked against max_seq_len when it was built)."""
        if not isinstance(start, Tensor) and start + n_tokens > self.config.max_seq_len:
            raise ValueError(
                f"sequence reaches position {start + n_tokens}, past max_seq_len={self.config.max_seq_len}; shorten "
                "the input or build the model with a larger max_seq_len."
            )
        positions = start + torch.arange(n_tokens, device=self.embed_tokens.weight.device)
        return rope_cos_sin(positions, self.config.head_dim, self.config.rope_theta, dtype)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The one initialisation, also after meta-device construction and `to_empty`.

        N(0, init_std) everywhere, and N(0, init_std / sqrt(2 L)) for the projections that write into
        the residual stream (o_proj, down_proj): GPT-2's scaled residual init, so the residual's
        variance does not grow with depth. Norm weights are 1; DIFF parameters as their references.
        """
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=std)
        for block in self.layers:
            block.init_weights(std, out_std)
        self.norm.reset_parameters()
        if self.lm_head is not None:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=std)

    # ---- diagnostics (read by the monitoring callback) --------------------------------------

    @contextlib.contextmanager
    def diagnostics(self) -> Iterator[list[dict]]:
        """Within this context every attention layer runs the eager kernel and records its internals
        (context, values, logits, probs, effective_probs, and lambda_ for DIFF) into the yielded
        per-layer dicts. Outside it, forward is untouched."""
        records = [{} for _ in self.layers]
        for block, record in zip(self.layers, records):
            block.self_attn.diagnostics = record
        try:
            yield records
        finally:
            for block in self.layers:
                block.self_attn.diagnostics = None

    # ---- generation ------------------------------------------------------------------------

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        """A cache for `max_len` tokens; dtype None takes the keys' compute dtype at the first forward."""
        device = self.embed_tokens.weight.device
        return KVCache(self.config, batch_size, max_len or self.config.max_seq_len, dtype, device)

    @torch.no_grad()
    def stream(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               top_p: float | None = None, generator: torch.Generator | None = None,
               decode: str | GrowingCache = "eager") -> Iterator[Tensor]:
        """Yields the next token [B] per step: one prefill over the prompt, then one token at a time.

        decode: "eager" (a growing KVCache, this model's own forward every step) or a decoder with the
            methods of `generation.GrowingCache`: `diffv2_lit.inference.decoding.Decoder` fills static caches
            and replays a compiled (on GPUs captured) one-token step; `shared_decoder(model, mode)` there keeps
            one per model and mode, so later calls replay the compiled step over the same cache buffers.
        """
        decoder = _decoder(decode)
        total = input_ids.shape[1] + max_new_tokens
        if total > self.config.max_seq_len:
            raise ValueError(
                f"prompt ({input_ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds the "
                f"model's context of {self.config.max_seq_len} tokens; shorten the prompt or ask for fewer tokens."
            )
        cache = decoder.new_cache(self.config, input_ids.shape[0], total, self.embed_tokens.weight.device)
        try:
            logits = self(input_ids, cache)[:, -1]  # the prefill runs uncompiled: its length varies
            for step in range(max_new_tokens):
                token = sample_next_token(logits, temperature, top_k, top_p, generator)
                yield token
                if step + 1 < max_new_tokens:
                    logits = decoder.logits(self, token[:, None], cache)
        finally:
            decoder.release(cache)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 decode: str | GrowingCache = "eager") -> Tensor:
        """input_ids [B, T] -> [B, T + max_new_tokens], decoding with a KV cache (see `stream`)."""
        new_tokens = list(self.stream(input_ids, max_new_tokens, temperature, top_k, top_p, generator, decode))
        if not new_tokens:
            return input_ids
        return torch.cat([input_ids, torch.stack(new_tokens, dim=1)], dim=1)


def _decoder(decode: str | GrowingCache) -> GrowingCache:
    if not isinstance(decode, str):
        return decode
    if decode != "eager":
        raise ValueError(f"decode={decode!r}: the model decodes eagerly by itself; static caches and compiled steps "
                         f"are kept outside it: pass decode=diffv2_lit.inference.decoding.shared_decoder(model, "
                         f"{decode!r}) (or a Decoder({decode!r}) of your own).")
    return GrowingCache()
