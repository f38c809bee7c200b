"""Memory per GPU of a training run, term by term, for the configuration that will actually run
(`diffv2-lit plan` prints it; the recipes' comment blocks quote it).

Per GPU, in bytes, N parameters sharded over G GPUs, m the master (parameter) dtype's bytes (4: fp32),
c the compute dtype's (2: bf16, FSDP2's `param_dtype`), r the gradient-reduction dtype's (4:
`reduce_dtype`):

    states        FSDP2 / FSDP1: 4 m S on the GPU (0 with `cpu_offload`: they live on the host), where
                  S = sum over parameters of ceil(rows / G) x columns is one rank's padded shard
                  (about N / G): parameters m S, gradients m S, AdamW moments 2 m S.
                  DDP / one device: 4 m N, plus m N for DDP's gradient buckets.
    gathered      FSDP: 2 c N_block (the running and the prefetched block) + c N_root (the root, kept
                  gathered: embeddings, final norm, lm_head) + 2 r N_block (two blocks' gradients in
                  flight for reduce-scatter) + c N_root (the root's unsharded gradient, alive through
                  the whole backward). DDP / one device under autocast: c N (the weights' casts).
    accumulated   FSDP2 with gradient accumulation and `fsdp_sync_every_micro_batch: false` (the default):
                  every parameter's unsharded gradient stays on each GPU until the last micro-batch,
                  in r (or c when no reduce dtype is set): r N. Not divided by G. 0 when syncing every
                  micro-batch, without accumulation, and under DDP (whose gradients accumulate in
                  place) or FSDP1 (which Lightning reduce-scatters every micro-batch).
    activations   L A_block, or with checkpointing every k-th block:
                  ceil(L / k) c B T D (block inputs) + (L - ceil(L / k)) A_block + A_block (one recompute)
    logits        `plain`: B T V x 12 at the start of backward (fp32 log-softmax kept for backward, the
                  loss's fp32 gradient, the log-softmax's fp32 gradient).
                  `chunked` / `liger` (loss.py: the full logits never exist): the gradients of the
                  hidden states c B T D and of the output weight [V, D], kept from forward to backward
                  and scaled once there (x2), or in forward the fp32 weight gradient 4 V D plus one
                  chunk of logits, whichever is larger.
    overhead      1.5 GiB (CUDA context, kernels' workspace) + 10% of the terms above (fragmentation).

A_block (tensors autograd keeps for one block, in the compute dtype; flash/SDPA attention, so no T x T
matrix): c B T (4 D + 2 Hq d + 2 h_kv d + h d + 4 F) + 4 B T * 2 D (RMSNorm's fp32 copies): the two norms'
normalised and scaled outputs, q and the attention output, k and v, o_proj's input (DIFF only: the baseline's
is the attention output itself), SwiGLU's gate, up, silu and product (eager PyTorch, measured: tests/training/test_memory_activations.py; torch.compile may keep less).

The parameter, gradient, optimizer-state and accumulated-gradient terms are exact (checked against the
bytes a 2-process FSDP2 run holds: tests/training/test_memory_measured.py); activations, logits and
overhead are estimates. Measure with ThroughputMFU's perf/peak_memory_gb on the first steps of a run.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from diffv2_lit.model.config import ModelConfig
from diffv2_lit.model.transformer import Transformer

GIB = 2**30
OVERHEAD_BYTES = 1.5 * GIB
FRAGMENTATION = 1.10
DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2}
STRATEGIES = ("fsdp2", "fsdp1", "ddp", "single")
LOSS_CHUNK = 4096  # loss.py's chunk_size for `chunked`


@dataclass(frozen=True)
class Layout:
    """Everything besides the model that decides the memory of a run (what `diffv2-lit plan` reads from the
    Trainer, DecoderLM and data sections of a config)."""

    micro_batch: int
    seq_len: int
    n_gpus: int = 1
    strategy: str = "fsdp2"          # fsdp2 (ModelParallelStrategy) | fsdp1 (FSDPStrategy) | ddp | single
    accumulation: int = 1
    sync_every_micro_batch: bool = False
    activation_checkpointing: bool | int = False
    loss_impl: str = "plain"         # as it will run: plain | chunked | liger (not auto)
    cpu_offload: bool = False
    master_dtype: str = "float32"    # the parameters' and AdamW's dtype
    compute_dtype: str = "bfloat16"  # FSDP2's param_dtype, or autocast's
    reduce_dtype: str | None = "float32"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {STRATEGIES}")
        if self.loss_impl not in ("plain", "chunked", "liger"):
            raise ValueError(f"loss_impl={self.loss_impl!r}: resolve `auto` first (plain, chunked or liger)")

    @property
    def sharded(self) -> bool:
        return self.strategy in ("fsdp2", "fsdp1")

    @property
    def keeps_unsharded_gradients(self) -> bool:
        """FSDP2 no-sync accumulation: gradients stay unsharded on every rank between micro-batches."""
        return self.strategy == "fsdp2" and self.accumulation > 1 and not self.sync_every_micro_batch


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, term by term (`terms()`), and the states' bytes on the host under CPU offload."""

    parameters: float
    gradients: float
    optimizer: float
    gathered: float
    accumulated: float
    activations: float
    logits: float
    host: float = 0.0

    @property
    def states(self) -> float:
        return self.parameters + self.gradients + self.optimizer

    @property
    def overhead(self) -> float:
        return (FRAGMENTATION - 1) * self._sum() + OVERHEAD_BYTES

    def _sum(self) -> float:
        return self.states + self.gathered + self.accumulated + self.activations + self.logits

    @property
    def total(self) -> float:
        return self._sum() + self.overhead

    def terms(self) -> dict[str, float]:
        """The terms `diffv2-lit plan` prints, in bytes; they sum to `total`."""
        return {"states": self.states, "gathered parameters": self.gathered,
                "accumulated gradients": self.accumulated, "activations": self.activations,
                "logits": self.logits, "overhead": self.overhead}


def parameter_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every parameter, from a model built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        model = Transformer(config)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def shard_numel(shape: tuple[int, ...], n_gpus: int) -> int:
    """Elements one rank holds of a parameter FSDP shards on dim 0: ceil(rows / G) rows (padded)."""
    rows = shape[0] if shape else 1
    return -(-rows // n_gpus) * math.prod(shape[1:])


def block_activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int, compute_bytes: int = 2) -> float:
    tokens = micro_batch * seq_len
    d, dim, ffn = config.head_dim, config.dim, config.ffn_hidden_dim
    # Baseline attention's output is o_proj's input as it is; DIFF's subtraction makes a new tensor.
    o_input = 0 if config.attention == "baseline" else config.n_heads * d
    narrow = compute_bytes * tokens * (4 * dim + 2 * config.n_query_heads * d + 2 * config.n_kv_heads * d
                                       + o_input + 4 * ffn)
    return narrow + 4 * tokens * 2 * dim


def estimate_memory(config: ModelConfig, layout: Layout) -> MemoryEstimate:
    shapes = parameter_shapes(config)
    n_total = sum(math.prod(s) for s in shapes.values())
    n_block = sum(math.prod(s) for name, s in shapes.items() if name.startswith("layers.")) / config.n_layers
    n_root = n_total - n_block * config.n_layers
    m, c = DTYPE_BYTES[layout.master_dtype], DTYPE_BYTES[layout.compute_dtype]
    r = DTYPE_BYTES[layout.reduce_dtype] if layout.reduce_dtype else c

    held = sum(shard_numel(s, layout.n_gpus) for s in shapes.values()) if layout.sharded else n_total
    parameters, gradients, optimizer = m * held, m * held, 2 * m * held
    buckets = m * n_total if layout.strategy == "ddp" and layout.n_gpus > 1 else 0
    host = 0.0
    if layout.cpu_offload and layout.sharded:
        host, parameters, gradients, optimizer = parameters + gradients + optimizer, 0.0, 0.0, 0.0
    if layout.sharded:
        gathered = 2 * c * n_block + c * n_root + 2 * r * n_block + c * n_root
    else:
        gathered = c * n_total if c != m else 0.0
    accumulated = r * n_total if layout.keeps_unsharded_gradients else 0.0
    return MemoryEstimate(
        parameters=parameters, gradients=gradients + buckets, optimizer=optimizer, gathered=gathered,
        accumulated=accumulated, activations=_activation_bytes(config, layout, c),
        logits=_logits_bytes(config, layout, c), host=host)


def _activation_bytes(config: ModelConfig, layout: Layout, compute_bytes: int) -> float:
    per_block = block_activation_bytes(config, layout.micro_batch, layout.seq_len, compute_bytes)
    every = 1 if layout.activation_checkpointing is True else int(layout.activation_checkpointing or 0)
    if not every:
        return config.n_layers * per_block
    checkpointed = -(-config.n_layers // every)  # blocks 0, k, 2k, ...
    block_inputs = checkpointed * compute_bytes * layout.micro_batch * layout.seq_len * config.dim
    return block_inputs + (config.n_layers - checkpointed) * per_block + per_block


def _logits_bytes(config: ModelConfig, layout: Layout, compute_bytes: int) -> float:
    tokens, vocab, dim = layout.micro_batch * layout.seq_len, config.vocab_size, config.dim
    if layout.loss_impl == "plain":
        return 12 * tokens * vocab
    if layout.loss_impl == "chunked":
        chunk = min(tokens, LOSS_CHUNK)
    else:  # liger sizes its chunks so that a chunk's logits are about as large as the hidden states
        chunk = min(tokens, 2 ** math.ceil(math.log2(max(1, -(-tokens // -(-vocab // dim))))))
    kept = compute_bytes * tokens * dim + compute_bytes * vocab * dim  # grad of hidden and of the weight
    in_forward = compute_bytes * tokens * dim + 4 * vocab * dim + 2 * compute_bytes * vocab * dim \
        + (4 + compute_bytes) * chunk * vocab
    return max(2 * kept, in_forward)


def estimate_memory_gib(config: ModelConfig, micro_batch: int, seq_len: int, n_gpus: int,
                        activation_checkpointing: bool | int = False, **layout) -> float:
    """Total GiB per GPU; `layout` takes the other `Layout` fields (accumulation, loss_impl, ...)."""
    return estimate_memory(config, Layout(micro_batch, seq_len, n_gpus,
                                          activation_checkpointing=activation_checkpointing, **layout)).total / GIB


# The memory a recipe may plan to use on an 80 GB GPU (74.5 GiB): 90% of it, leaving room for what the
# estimate leaves out (NCCL buffers, the allocator's own fragmentation beyond FRAGMENTATION).
RECIPE_BUDGET_GIB = 72.0


def largest_micro_batch(config: ModelConfig, layout: Layout, sequences_per_gpu: int,
                        budget_gib: float = RECIPE_BUDGET_GIB) -> int:
    """The largest power-of-two micro-batch that fits `budget_gib` and divides the sequences each GPU sees
    per optimizer step (so that gradient accumulation makes up the rest of the global batch exactly).
    `layout`'s micro_batch and accumulation are replaced by each candidate's."""
    best = 0
    micro_batch = 1
    while micro_batch <= sequences_per_gpu and sequences_per_gpu % micro_batch == 0:
        candidate = dataclasses.replace(layout, micro_batch=micro_batch, accumulation=sequences_per_gpu // micro_batch)
        if estimate_memory(config, candidate).total / GIB > budget_gib:
            break
        best, micro_batch = micro_batch, 2 * micro_batch
    if not best:
        raise ValueError(f"not even one sequence of {layout.seq_len} tokens fits {budget_gib} GiB per GPU on "
                         f"{layout.n_gpus} GPUs: turn activation checkpointing on or use more GPUs.")
    return best
