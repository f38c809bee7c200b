"""The global gradient norm before clipping, and clipping by it: one implementation for the module's
logging, its gradient clipping and the spike detector (which asks first, through
`DecoderLM.gradient_norm()`, so the norm is computed once per optimizer step).

Clipping lives here rather than in Lightning's precision plugins because two of them cannot clip by
norm at all: `MixedPrecision` refuses any optimizer that unscales inside `step()` (fused AdamW), and
`FSDPPrecision` (FSDP1) raises for `gradient_clip_algorithm="norm"`. Scaling every gradient by
`max_norm / total_norm` is what `clip_grad_norm_` does, and is correct for sharded gradients as long as
`total_norm` is the global one."""

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


def clip_by_total_norm_(parameters, max_norm: float, total_norm: Tensor) -> None:
    """Scale gradients in place so that their global norm is at most `max_norm`, given that global norm.

    Works on plain, FSDP1 (flat shards) and FSDP2 (DTensor) gradients alike: every rank scales its own
    shard by the same factor. No host sync (the factor stays a tensor).
    """
    with_grads = [p for p in parameters if p.grad is not None]
    if with_grads:
        torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, total_norm.to(with_grads[0].grad.device))


def unscale_fused_(scaler, optimizer) -> None:
    """fp16 (`16-mixed`): unscale the gradients of an optimizer that unscales inside `step()` (fused AdamW),
    which Lightning leaves scaled. Call it once per step, before reading the gradients: the norm, the
    clipping and any skip then see true gradients, and GradScaler has recorded its inf check (its
    `update()` fails without one, even when the gradients are dropped afterwards). No-op without a scaler."""
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
