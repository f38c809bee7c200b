"""A back-of-the-envelope GPU memory estimate for the recipes (the numbers in their comment blocks).

Per GPU, in bytes, for N parameters sharded over G GPUs (FSDP2, fp32 master weights, bf16 compute):

    states       16 N / G        fp32 parameters 4 + gradients 4 + AdamW moments 8
    gathered     2 * 2 N_block + 2 N_root + 2 * 4 N_block
                                 bf16 parameters of the running and the prefetched block, the root
                                 kept gathered (embeddings, lm_head), fp32 unsharded gradients of two
                                 blocks in flight for reduce-scatter
    activations  L * A_block, or with checkpointing every k-th block:
                 (L / k) * 2 B T D  (block inputs) + (L - L / k) * A_block + A_block (one recompute)
    logits       B T V * (2 + 4 + 4)   bf16 logits, fp32 copy for the loss, fp32 gradient
    overhead     1.5 GiB (CUDA context, kernels' workspace) and 10% for allocator fragmentation

A_block (bf16 tensors autograd keeps for one block, flash/SDPA attention so no T x T matrix):
    2 B T (4 D + 2 Hq d + 2 h_kv d + h d + 3 F) + 4 B T * 2 D (RMSNorm's fp32 copies)
It is an estimate to size micro-batches, not a guarantee; measure with ThroughputMFU's
perf/peak_memory_gb on the first steps of a run.
"""

from __future__ import annotations

from diffv2_lit.model import ModelConfig, count_parameters

GIB = 2**30
OVERHEAD_BYTES = 1.5 * GIB
FRAGMENTATION = 1.10


def block_activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int) -> float:
    tokens = micro_batch * seq_len
    d, dim, ffn = config.head_dim, config.dim, config.ffn_hidden_dim
    bf16 = 2 * tokens * (4 * dim + 2 * config.n_query_heads * d + 2 * config.n_kv_heads * d
                         + config.n_heads * d + 3 * ffn)
    return bf16 + 4 * tokens * 2 * dim


def estimate_memory_bytes(config: ModelConfig, micro_batch: int, seq_len: int, n_gpus: int,
                          activation_checkpointing: bool | int = False) -> float:
    counts = count_parameters(config)
    n_total = counts["total"]
    n_root = counts["embedding"] + counts["lm_head"]
    n_block = (n_total - n_root) / config.n_layers
    states = 16 * n_total / n_gpus
    gathered = 2 * 2 * n_block + 2 * n_root + 2 * 4 * n_block
    activations = _activation_bytes(config, micro_batch, seq_len, activation_checkpointing)
    logits = micro_batch * seq_len * config.vocab_size * (2 + 4 + 4)
    return (states + gathered + activations + logits) * FRAGMENTATION + OVERHEAD_BYTES


def _activation_bytes(config: ModelConfig, micro_batch: int, seq_len: int, checkpointing: bool | int) -> float:
    per_block = block_activation_bytes(config, micro_batch, seq_len)
    every = 1 if checkpointing is True else int(checkpointing or 0)
    if not every:
        return config.n_layers * per_block
    checkpointed = -(-config.n_layers // every)  # blocks 0, k, 2k, ...
    block_inputs = checkpointed * 2 * micro_batch * seq_len * config.dim
    return block_inputs + (config.n_layers - checkpointed) * per_block + per_block


def estimate_memory_gib(config: ModelConfig, micro_batch: int, seq_len: int, n_gpus: int,
                        activation_checkpointing: bool | int = False) -> float:
    return estimate_memory_bytes(config, micro_batch, seq_len, n_gpus, activation_checkpointing) / GIB


# The memory a recipe may plan to use on an 80 GB GPU (74.5 GiB): 90% of it, leaving room for what the
# estimate leaves out (NCCL buffers, the allocator's own fragmentation beyond FRAGMENTATION).
RECIPE_BUDGET_GIB = 72.0


def largest_micro_batch(config: ModelConfig, seq_len: int, n_gpus: int, sequences_per_gpu: int,
                        activation_checkpointing: bool | int = False, budget_gib: float = RECIPE_BUDGET_GIB) -> int:
    """The largest power-of-two micro-batch that fits `budget_gib` and divides the sequences each GPU sees
    per optimizer step (so that gradient accumulation makes up the rest of the global batch exactly)."""
    best = 0
    micro_batch = 1
    while micro_batch <= sequences_per_gpu and sequences_per_gpu % micro_batch == 0:
        if estimate_memory_gib(config, micro_batch, seq_len, n_gpus, activation_checkpointing) > budget_gib:
            break
        best, micro_batch = micro_batch, 2 * micro_batch
    if not best:
        raise ValueError(f"not even one sequence of {seq_len} tokens fits {budget_gib} GiB per GPU on {n_gpus} GPUs: "
                         "turn activation checkpointing on or use more GPUs.")
    return best
