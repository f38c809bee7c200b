"""KV caches, a capturable decode step, and token sampling.

Shape legend: B batch, T tokens of this call, S cache slots, h_kv KV heads, d head dim, V vocabulary.

The caches store keys and values exactly as k_proj / v_proj produce them: h_kv heads of width d for
every variant. DIFF V2 doubles only the query heads, so its cache is the baseline's size (the
write-up's decoding claim); DIFF V1 also fits in h_kv * d per token, but reads it twice per step.

Two caches with one interface (`length`, `update`, `mask`, `advance`):
- `KVCache` hands attention the filled part of its buffers; shapes grow by one token per step.
- `StaticKVCache` hands over all S slots and a [T, S] mask of the filled ones, and keeps its position in
  a device tensor, so a decode step has the same shapes, addresses and no host values every time: the
  step can be captured once and replayed (`DecodeStep`: torch.compile, CUDA graphs on GPUs). `Decoder`
  keeps the compiled step and its caches between calls (`shared_decoder`: one per model and mode). A 125m
  decode step is ~100 kernel launches for ~0.05 ms of memory traffic on an H200; replaying a captured
  graph removes the launch cost that otherwise sets the speed.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
from torch import Tensor

from diffv2_lit.model.config import ModelConfig


class KVCache:
    """Preallocated per-layer keys and values, [B, max_len, h_kv, d] each.

    With `dtype=None` the buffers are allocated at the first `update`, in the dtype and on the device of
    the keys the model computes: that is the compute dtype, whichever way it is set (FSDP2's
    MixedPrecisionPolicy casts bf16 copies of fp32 master weights inside forward; autocast casts the
    projections), while the weights seen from outside may be fp32. A cache in the weights' dtype would
    hand fp32 keys to bf16 queries.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.keys: list[Tensor | None] = [None] * config.n_layers
        self.values: list[Tensor | None] = [None] * config.n_layers
        if dtype is not None:
            for layer_idx in range(config.n_layers):
                self._allocate(layer_idx, dtype, device)
        self.max_len = max_len
        self.length = 0  # tokens already cached; the model advances it after each forward
        self.mask: Tensor | None = None  # attention aligns the queries to the last keys (kernels' default)

    def _allocate(self, layer_idx: int, dtype: torch.dtype, device: torch.device | None) -> None:
        self.keys[layer_idx] = torch.zeros(self.shape, dtype=dtype, device=device)
        self.values[layer_idx] = torch.zeros(self.shape, dtype=dtype, device=device)

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store this call's k, v [B, T, h_kv, d] and return everything cached so far, [B, S, h_kv, d]."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} tokens; this call would reach {end}.")
        if self.keys[layer_idx] is None:
            self._allocate(layer_idx, k.dtype, k.device)
        self.keys[layer_idx][:, self.length:end] = k
        self.values[layer_idx][:, self.length:end] = v
        return self.keys[layer_idx][:, :end], self.values[layer_idx][:, :end]

    def begin(self, n_tokens: int) -> None:
        """Called by the model before a forward of `n_tokens` tokens (nothing to prepare here)."""

    def advance(self, n_tokens: int) -> None:
        self.length += n_tokens

    @staticmethod
    def bytes_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * config.n_layers * config.n_kv_heads * config.head_dim * element


class StaticKVCache:
    """Keys and values in fixed [B, S, h_kv, d] buffers, the position in a 0-d device tensor.

    `length` is that tensor; `update` writes this call's keys at positions length .. length+T-1 with
    `index_copy_` and returns the whole buffers; `mask` [T, S] lets query i read slots 0 .. length+i.
    Buffers are allocated at the first update, in the keys' dtype (see KVCache), and marked as static
    addresses so a compiled step may write into them.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device: torch.device | None = None) -> None:
        if max_len > config.max_seq_len:
            raise ValueError(f"a cache of {max_len} tokens exceeds the model's context of {config.max_seq_len} tokens.")
        self.shape = (batch_size, max_len, config.n_kv_heads, config.head_dim)
        self.keys: list[Tensor | None] = [None] * config.n_layers
        self.values: list[Tensor | None] = [None] * config.n_layers
        self.max_len = max_len
        self.length = torch.zeros((), dtype=torch.long, device=device)
        self.slots = torch.arange(max_len, device=device)
        self.mask: Tensor | None = None
        self._offsets: Tensor | None = None
        _mark_static(self.length)

    def begin(self, n_tokens: int) -> None:
        self._offsets = self.length + torch.arange(n_tokens, device=self.length.device)  # [T] positions
        self.mask = self.slots[None, :] <= self._offsets[:, None]  # [T, S]

    def reset(self) -> None:
        """Empty again, in place: the buffers keep their addresses (a captured step wrote into them)."""
        self.length.zero_()
        for buffer in self.keys + self.values:
            if buffer is not None:
                buffer.zero_()

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if self.keys[layer_idx] is None or self.keys[layer_idx].dtype != k.dtype:  # first use, or a new dtype
            self.keys[layer_idx] = _mark_static(torch.zeros(self.shape, dtype=k.dtype, device=k.device))
            self.values[layer_idx] = _mark_static(torch.zeros(self.shape, dtype=v.dtype, device=v.device))
        self.keys[layer_idx].index_copy_(1, self._offsets, k)
        self.values[layer_idx].index_copy_(1, self._offsets, v)
        return self.keys[layer_idx], self.values[layer_idx]

    def advance(self, n_tokens: int) -> None:
        self.length.add_(n_tokens)


def _mark_static(tensor: Tensor) -> Tensor:
    """Tell torch.compile this tensor keeps its address, so a captured CUDA graph may mutate it in place."""
    torch._dynamo.mark_static_address(tensor)
    return tensor


def _last_logits(forward: Callable[[Tensor, StaticKVCache], Tensor], tokens: Tensor, cache: StaticKVCache) -> Tensor:
    return forward(tokens, cache)[:, -1]


def _with_own_code(function: Callable) -> Callable:
    """A copy of `function` with a code object of its own. Dynamo stores compiled graphs, and counts them against
    its recompile limit (8), per code object: steps compiled from one shared function for several models, modes
    and batch sizes exhaust it, and with fullgraph=True the next one raises FailOnRecompileLimitHit."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


class DecodeStep:
    """`step(forward, tokens [B, 1], cache) -> logits [B, V]` against a StaticKVCache, compiled once and replayed.

    mode: "eager" (no compilation), "compile" (torch.compile's default mode), "cuda-graphs"
    (`mode="reduce-overhead"`: the step is captured into a CUDA graph and replayed, CUDA only).
    Each DecodeStep compiles its own copy of the step function, so its graphs (one per batch size the first
    time, then one with a dynamic batch; one per dtype) count against no other step's recompile limit.
    Build one per model and mode and keep it (`Decoder` does): a new one compiles again.
    backend: torch.compile's backend, inductor unless told (e.g. "aot_eager" to debug a wrong result).
    The model is an argument rather than an attribute so that a step kept per model (`shared_decoder`'s
    weak registry) does not keep that model alive.
    """

    MODES = ("eager", "compile", "cuda-graphs")

    def __init__(self, mode: str = "eager", backend: str = "inductor") -> None:
        if mode not in self.MODES:
            raise ValueError(f"decode mode {mode!r} is unknown; choose one of {self.MODES}.")
        self.mode = mode
        step = _with_own_code(_last_logits)
        if mode != "eager":
            compile_mode = "reduce-overhead" if mode == "cuda-graphs" else None
            step = torch.compile(step, fullgraph=True, backend=backend, mode=compile_mode)
        self._compiled = step

    def __call__(self, forward: Callable[[Tensor, StaticKVCache], Tensor], tokens: Tensor,
                 cache: StaticKVCache) -> Tensor:
        logits = self._compiled(forward, tokens, cache)
        # A CUDA-graph replay writes into the same output buffer each time: copy before the next replay.
        return logits.clone() if self.mode == "cuda-graphs" else logits


DECODE_MODES = ("eager", "static", "compile", "cuda-graphs")
STATIC_CACHE_BUCKET = 256  # static caches come in multiples of this, so one compiled step serves many lengths


class Decoder:
    """What decoding keeps between calls, for one decode mode: the compiled step and the static caches.

    "eager" grows a new KVCache per call and keeps nothing. The other modes fill a StaticKVCache of a
    multiple of STATIC_CACHE_BUCKET slots; one per (batch, slots, device) is kept and reset at its next use,
    so a later call with the same batch and bucket hands the compiled step the same buffers, at the same
    addresses: a CUDA graph captured over them is replayed, not recorded again. A cache in use by an
    unfinished stream is not handed out twice (the second caller gets a fresh one). `backend`: DecodeStep's.
    """

    def __init__(self, mode: str = "eager", backend: str = "inductor") -> None:
        if mode not in DECODE_MODES:
            raise ValueError(f"decode={mode!r} is unknown; choose one of {DECODE_MODES}.")
        self.mode = mode
        self.step = DecodeStep(mode, backend) if mode in DecodeStep.MODES[1:] else None
        self.caches: dict[tuple, StaticKVCache] = {}
        self._busy: set[int] = set()

    def new_cache(self, config: ModelConfig, batch_size: int, n_tokens: int,
                  device: torch.device) -> KVCache | StaticKVCache:
        """A cache for `n_tokens` positions, empty; `release` it when the stream ends."""
        if self.mode == "eager":
            return KVCache(config, batch_size, n_tokens, None, device)
        slots = min(config.max_seq_len, -(-n_tokens // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET)
        key = (batch_size, slots, torch.device(device))
        cache = self.caches.get(key)
        if cache is None or id(cache) in self._busy:
            fresh = StaticKVCache(config, batch_size, slots, device)
            if cache is not None:
                return fresh
            cache = self.caches[key] = fresh
        cache.reset()
        self._busy.add(id(cache))
        return cache

    def release(self, cache: KVCache | StaticKVCache) -> None:
        self._busy.discard(id(cache))

    def logits(self, forward: Callable[[Tensor, StaticKVCache], Tensor], tokens: Tensor,
               cache: KVCache | StaticKVCache) -> Tensor:
        """One decode step: tokens [B, 1] -> logits [B, V] of the last position."""
        if self.step is None:
            return forward(tokens, cache)[:, -1]
        return self.step(forward, tokens, cache)


_SHARED_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_decoder(forward: Callable, mode: str) -> Decoder:
    """The Decoder kept for `forward` (a model, or the wrapper that runs it) and `mode`, for as long as
    `forward` lives: `Transformer.generate(decode="cuda-graphs")` called twice compiles and captures once.
    Kept here, weakly keyed, rather than on the model, so the model holds no compile state."""
    if mode == "eager":
        return Decoder("eager")  # nothing worth keeping
    decoders = _SHARED_DECODERS.setdefault(forward, {})
    if mode not in decoders:
        decoders[mode] = Decoder(mode)
    return decoders[mode]


def sample_next_token(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """logits [B, V] -> token ids [B]. temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if top_p is not None and top_p < 1.0:
        logits = _top_p_filter(logits, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)


def _top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (always at least the top one)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the mass before a token reaches top_p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))
