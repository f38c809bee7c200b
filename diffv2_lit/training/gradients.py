"""The global gradient norm before clipping: one implementation for the module's logging and the
spike detector (which asks first, through `DecoderLM.gradient_norm()`, so it is computed once)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def global_grad_norm(parameters, plain_grads_sharded: bool = False) -> Tensor:
    """L2 norm over all gradients, as `clip_grad_norm_` computes it, global across ranks.

    - DTensor gradients (FSDP2): `get_total_norm` gives a partial norm; `full_tensor()` reduces it.
    - Plain gradients: local. Under FSDP1 each rank holds a flat shard, so pass
      `plain_grads_sharded=True` to sum their squares over ranks (DDP grads are already identical).
    Returns a 0-d fp32 tensor (0 when there are no gradients, e.g. after a skipped step).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    squares = []
    dtensor_grads = [g for g in grads if is_dtensor(g)]
    if dtensor_grads:
        squares.append(torch.nn.utils.get_total_norm(dtensor_grads).full_tensor().float().square())
    plain = [g for g in grads if not is_dtensor(g)]
    if plain:
        local = torch.nn.utils.get_total_norm(plain).float().square()
        if plain_grads_sharded and dist.is_available() and dist.is_initialized():
            dist.all_reduce(local, op=dist.ReduceOp.SUM)
        squares.append(local)
    if not squares:
        return torch.zeros(())
    device = squares[0].device
    return torch.stack([s.to(device) for s in squares]).sum().sqrt()
