"""Decoding outside the model: compiled one-token steps and the static caches they replay over.

`Transformer.stream` / `generate` take a decoder as `decode=` (without one they grow a `KVCache` and call the
model eagerly). The decoders here keep what is worth keeping between calls:

- `DecodeStep`: one `torch.compile`d step against a `StaticKVCache` (`compile`; `cuda-graphs` captures it into
  a CUDA graph and replays it). A 125m decode step is ~100 kernel launches for ~0.05 ms of memory traffic on
  an H200; replaying a captured graph removes the launch cost that otherwise sets the speed.
- `Decoder`: the step of one mode and the static caches, one per (batch, length bucket, device), reset in
  place so that a captured graph sees the same addresses again.
- `shared_decoder(model, mode)`: the Decoder kept per model and mode (a weak registry: the model holds no
  compile state), for `diffv2-lit generate` and `SampleText`.
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Callable

import torch
from torch import Tensor, nn

from diffv2_lit.model.config import ModelConfig
from diffv2_lit.model.generation import KVCache, StaticKVCache


def _last_logits(model: Callable[[Tensor, StaticKVCache], Tensor], tokens: Tensor, cache: StaticKVCache) -> Tensor:
    return model(tokens, cache)[:, -1]


def _with_own_code(function: Callable) -> Callable:
    """A copy of `function` with a code object of its own. Dynamo stores compiled graphs, and counts them against
    its recompile limit (8), per code object: steps compiled from one shared function for several models, modes
    and batch sizes exhaust it, and with fullgraph=True the next one raises FailOnRecompileLimitHit."""
    return types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__,
                              function.__defaults__, function.__closure__)


class DecodeStep:
    """`step(model, tokens [B, 1], cache) -> logits [B, V]` against a StaticKVCache, compiled once and replayed.

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

    def __call__(self, model: Callable[[Tensor, StaticKVCache], Tensor], tokens: Tensor,
                 cache: StaticKVCache) -> Tensor:
        logits = self._compiled(model, tokens, cache)
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

    def logits(self, model: Callable[[Tensor, StaticKVCache], Tensor], tokens: Tensor,
               cache: KVCache | StaticKVCache) -> Tensor:
        """One decode step: tokens [B, 1] -> logits [B, V] of the last position."""
        if self.step is None:
            return model(tokens, cache)[:, -1]
        return self.step(model, tokens, cache)


_SHARED_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def shared_decoder(model: nn.Module, mode: str) -> Decoder:
    """The Decoder kept for `model` and `mode`, for as long as `model` lives: `model.generate(ids, n,
    decode=shared_decoder(model, "cuda-graphs"))` called twice compiles and captures once. Kept here, weakly
    keyed, rather than on the model, so the model holds no compile state."""
    if mode == "eager":
        return Decoder("eager")  # nothing worth keeping
    decoders = _SHARED_DECODERS.setdefault(model, {})
    if mode not in decoders:
        decoders[mode] = Decoder(mode)
    return decoders[mode]
