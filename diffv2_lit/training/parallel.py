"""Parallelism applied from outside the model, in one function called from `DecoderLM.configure_model()`.

The order is fixed and matters:
0. float8 (`model.float8`, training/float8.py): the converted linear layers are what gets checkpointed,
   compiled and sharded (FSDP2 then all-gathers their weights in float8);
1. activation checkpointing per block: it wraps the block, so it must be inside what gets compiled
   and sharded (recompute happens inside the compiled, sharded unit);
2. torch.compile per block: compiling blocks (not the whole model) keeps graphs small and identical
   across layers (one compilation reused), and compiles the checkpointed forward;
3. FSDP2 `fully_shard` per block, then the root (embeddings, final norm, lm_head): each block becomes
   one all-gather / reduce-scatter unit, and the root picks up the parameters no block owns.

On GPUs the model is still on the meta device when this runs; the caller materialises the shards
(`to_empty`) and runs the one `init_weights()` afterwards, so no rank ever holds the full model.
(On CPU meshes, where DTensor's random ops are not sharding-aware, DecoderLM initialises first; with
CPU offload on GPUs it initialises the shards on the GPU and then moves them to the host.)
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from diffv2_lit.errors import UsageError
from diffv2_lit.training.float8 import apply_float8, recipe_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REDUCE_DTYPES = ("bfloat16", "float32")


@dataclasses.dataclass(frozen=True)
class ParallelSettings:
    """How the model is parallelised and made cheaper to train, `model.parallel.<key>` in a recipe (the model's
    own shape is `model.architecture`). The FSDP2 settings apply only under `ModelParallelStrategy`; other
    strategies take their precision from the Trainer.

    Args:
        activation_checkpointing: False, True (every block) or N (every N-th block).
        compile: torch.compile each block.
        fsdp_param_dtype / fsdp_reduce_dtype: FSDP2 mixed precision: compute in this dtype, reduce gradients
            in that one (None: the parameters' own, fp32 under `precision: 32-true`).
        cpu_offload: FSDP2: sharded parameters, gradients and optimizer state in host memory.
        fsdp_sync_every_micro_batch: FSDP2 with gradient accumulation: False (default) keeps the micro-batches'
            gradients unsharded on each rank and reduce-scatters once per optimizer step (1/N of the traffic for
            N micro-batches, at the memory of one unsharded gradient copy); True reduce-scatters after every
            micro-batch (less memory, N times the traffic).
        fsdp_shard_size: FSDP2. None (default) shards parameters, gradients and optimizer state over every rank;
            N (or `node`: the GPUs per node) shards within groups of N consecutive ranks and replicates across
            them (hybrid sharding, HSDP): all-gathers and reduce-scatters stay inside a node and only one
            gradient all-reduce per step crosses the network.
    """

    activation_checkpointing: bool | int = False
    compile: bool = False
    fsdp_param_dtype: Literal["bfloat16", "float16", "float32"] | None = "bfloat16"
    fsdp_reduce_dtype: Literal["bfloat16", "float32"] | None = "float32"
    cpu_offload: bool = False
    fsdp_sync_every_micro_batch: bool = False
    fsdp_shard_size: int | Literal["node"] | None = None

    def __post_init__(self) -> None:
        problem = self._problem()
        if problem:
            raise UsageError(f"model.parallel.{problem}")

    def _problem(self) -> str | None:
        every = self.activation_checkpointing
        if not isinstance(every, (bool, int)) or every < 0:  # bools are ints: False 0, True 1
            return f"activation_checkpointing={every!r} must be false, true (every block) or N >= 1 (every N-th block)."
        for name in ("compile", "cpu_offload", "fsdp_sync_every_micro_batch"):
            if not isinstance(getattr(self, name), bool):
                return f"{name}={getattr(self, name)!r} must be true or false."
        for name, allowed in (("fsdp_param_dtype", tuple(DTYPES)), ("fsdp_reduce_dtype", REDUCE_DTYPES)):
            if getattr(self, name) not in (*allowed, None):
                return f"{name}={getattr(self, name)!r} is not one of: {', '.join(allowed)}, null."
        size = self.fsdp_shard_size
        if size not in (None, "node") and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            return f"fsdp_shard_size={size!r} must be null (every rank), node (the GPUs of a node) or N >= 1."
        return None

    @classmethod
    def of(cls, value: "ParallelSettings | dict | None") -> "ParallelSettings":
        """From a recipe's mapping or a checkpoint's plain dict (which names only the keys it was given)."""
        if value is None or isinstance(value, cls):
            return value or cls()
        unknown = sorted(set(value) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise UsageError(f"model.parallel.{unknown[0]} is not a parallelism setting; the settings: "
                             f"{', '.join(f.name for f in dataclasses.fields(cls))}.")
        return cls(**value)


# The settings that were DecoderLM arguments of their own before they were grouped (issue 21.5): a config
# that still names one is refused with its new key.
MOVED_TO_PARALLEL = {f"model.{f.name}": f"model.parallel.{f.name}" for f in dataclasses.fields(ParallelSettings)}


def parallelize(model: nn.Module, device_mesh=None, activation_checkpointing: bool | int = False,
                compile: bool = False, param_dtype: str | None = "bfloat16", reduce_dtype: str | None = "float32",
                cpu_offload: bool = False, float8: bool | str = False, shard_size: int | None = None) -> nn.Module:
    """Apply activation checkpointing, compile and FSDP2 to a `Transformer` (in that order), in place.

    activation_checkpointing: False, True (every block) or N (every N-th block: 0, N, 2N, ...).
    device_mesh: the data-parallel mesh from Lightning's `ModelParallelStrategy` (None: no sharding).
    param_dtype / reduce_dtype: FSDP2 mixed precision (compute in bf16, reduce gradients in fp32);
        the sharded master parameters stay in fp32 (run the Trainer with precision "32-true").
    float8: torchao float8 training of the blocks' projections (False, True = "tensorwise", "rowwise").
    shard_size: None shards over every rank of the mesh (FSDP2); N shards within groups of N ranks and
        replicates across the groups (HSDP: N = the GPUs of a node keeps all-gathers inside the node).
    """
    if recipe_name(float8):
        apply_float8(model, float8, sharded=device_mesh is not None)
    every = int(activation_checkpointing or 0)  # True: every block (DecoderLM refuses a negative N)
    if every:
        apply_activation_checkpointing(model, every)
    if compile:
        for block in model.layers:
            block.compile()  # in place: parameter names stay as they were (no `_orig_mod.`)
    if device_mesh is not None:
        apply_fsdp2(model, fsdp_mesh(device_mesh, shard_size), param_dtype, reduce_dtype, cpu_offload)
    return model


def apply_activation_checkpointing(model: nn.Module, every: int = 1) -> None:
    """Wrap every `every`-th block so its activations are recomputed in backward (non-reentrant).

    The wrapper's `_checkpoint_wrapped_module.` prefix is removed from state dicts by the wrapper's
    own hooks and by torch.distributed.checkpoint, so checkpoints keep the plain model names.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.layers):
        if index % every == 0:
            model.layers[index] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_fsdp2(model: nn.Module, device_mesh, param_dtype: str | None, reduce_dtype: str | None,
                cpu_offload: bool) -> None:
    """fully_shard each block, then the root."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    mesh = device_mesh
    policy = MixedPrecisionPolicy(param_dtype=DTYPES.get(param_dtype), reduce_dtype=DTYPES.get(reduce_dtype))
    kwargs = {"mesh": mesh, "mp_policy": policy}
    if cpu_offload:
        # Pinned host memory speeds up the copies to the GPU; it needs a CUDA driver, and a CPU mesh
        # (the 2-process tests) copies nothing anyway.
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=device_mesh.device_type == "cuda")
    for block in model.layers:
        fully_shard(block, **kwargs)
    # The root's parameters (embeddings, final norm, lm_head) are needed again right at the start of
    # backward, so keeping them gathered after forward saves one all-gather per step.
    fully_shard(model, reshard_after_forward=False, **kwargs)


def fsdp_mesh(device_mesh, shard_size: int | None = None):
    """The mesh FSDP2 shards over: Lightning's data-parallel mesh (1-D), or for hybrid sharding a 2-D
    ("replicate", "shard") mesh over the same ranks, shard groups of `shard_size` consecutive ranks (one node
    when ranks are numbered node by node, as torchrun and SLURM do)."""
    mesh = _data_parallel_mesh(device_mesh)
    if shard_size is None or shard_size == mesh.size():
        return mesh
    if shard_size < 1 or mesh.size() % shard_size:
        raise UsageError(f"model.parallel.fsdp_shard_size={shard_size} must divide the {mesh.size()} data-parallel ranks "
                         "(the GPUs per node, or null to shard over every rank).")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(mesh.device_type, (mesh.size() // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


def _data_parallel_mesh(device_mesh):
    """Lightning's ModelParallelStrategy mesh has dims ("data_parallel", "tensor_parallel")."""
    names = device_mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "diffv2-lit shards with FSDP2 only; set ModelParallelStrategy(data_parallel_size=<world size>, "
            "tensor_parallel_size=1) (its 'auto' sizes mean tensor parallel over the GPUs of a node)."
        )
    return device_mesh["data_parallel"] if "data_parallel" in names else device_mesh
