"""How a callback runs the model outside the training step, under every strategy.

Under FSDP2 (`ModelParallelStrategy`) the Transformer itself is the root of the sharding, so calling
`pl_module.model` gathers its parameters as training does. Under FSDP1 (`FSDPStrategy`) Lightning wraps
the whole LightningModule, and only that wrapper's forward gathers the root parameters (embeddings,
final norm) and casts them to the compute dtype: a direct call of `pl_module.model` would read the
rank's flat shard. So the call goes through the wrapper, which runs `DecoderLM.forward(input_ids, cache)`.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch import Tensor


def decode_mode(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """How a callback should decode: a captured step ("cuda-graphs") on one unsharded CUDA model; eagerly
    where the parameters are sharded (each step's all-gathers cannot be captured) or on the CPU."""
    from torch.distributed.tensor import DTensor

    wrapped = model_call(trainer, pl_module) is not pl_module.model  # FSDP1
    sharded = wrapped or any(isinstance(p, DTensor) for p in pl_module.model.parameters())  # FSDP2
    return "cuda-graphs" if pl_module.device.type == "cuda" and not sharded else "eager"


def model_call(trainer: L.Trainer, pl_module: L.LightningModule) -> Callable[..., Tensor]:
    """`call(input_ids, cache=None) -> logits` for `pl_module.model`, valid on every rank (a collective
    under sharding: every rank must make the same calls)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = trainer.model if trainer is not None else None
    if isinstance(wrapper, FullyShardedDataParallel):
        return wrapper
    return pl_module.model
