"""Gradient norms and in-place gradient scaling: one implementation for the module's step statistics,
its gradient clipping and the spike detector.

Norms are built from each rank's *local* squared norms, moved to the compute device, and summed over
ranks in one all-reduce of a scalar. That holds for every way gradients are laid out:

- plain gradients (one device, DDP): every rank holds the whole, already averaged gradient, so the
  local square is the global one and nothing is reduced;
- FSDP1 flat shards and FSDP2 DTensor shards: each rank holds a disjoint part, so the global square
  is the sum of the local ones. Under hybrid sharding (HSDP, a 2-D mesh) each part is held by every
  replica group, so each rank adds its square divided by the number of replicas. Working on `to_local()` tensors keeps DTensor from issuing one
  collective per parameter, and keeps CPU-offloaded shards (`model.parallel.cpu_offload`) out of the
  collective: the reduction gets one scalar on the compute device, which NCCL accepts.

Clipping lives here rather than in Lightning's precision plugins because two of them cannot clip by
norm at all: `MixedPrecision` refuses any optimizer that unscales inside `step()` (fused AdamW), and
`FSDPPrecision` (FSDP1) raises for `gradient_clip_algorithm="norm"`. Scaling every gradient by
`max_norm / total_norm` is what `clip_grad_norm_` does, and is correct for sharded gradients as long as
`total_norm` is the global one.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_dtensor(tensor: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def _local(tensor: Tensor) -> Tensor:
    return tensor.to_local() if is_dtensor(tensor) else tensor


def replicas(tensor: Tensor) -> int:
    """How many ranks hold each local part of a DTensor: the product of its replicated mesh dimensions
    (HSDP's replicate dimension; 1 for plain FSDP2 shards)."""
    count = 1
    for size, placement in zip(tensor.device_mesh.shape, tensor.placements):
        count *= size if placement.is_replicate() else 1
    return count


def local_squared_norms(parameters, device: torch.device, plain_grads_sharded: bool = False) -> tuple[Tensor, Tensor]:
    """(sharded, replicated): this rank's sum of squared gradient entries, as 0-d fp32 tensors on `device`.

    `sharded` holds the parts other ranks do not hold (DTensor shards; plain gradients when
    `plain_grads_sharded`, FSDP1's flat shards): sum it over ranks. `replicated` is already global.
    No collective, no host sync."""
    sharded, replicated, by_replicas = [], [], {}
    for p in parameters:
        if p.grad is None:
            continue
        grad = p.grad
        if is_dtensor(grad) and replicas(grad) > 1:  # HSDP: the replica groups hold the same shards
            by_replicas.setdefault(replicas(grad), []).append(_local(grad))
        else:
            (sharded if is_dtensor(grad) or plain_grads_sharded else replicated).append(_local(grad))
    sharded_square = _sum_of_squares(sharded, device)
    for count, grads in by_replicas.items():
        sharded_square = sharded_square + _sum_of_squares(grads, device) / count
    return sharded_square, _sum_of_squares(replicated, device)


def _sum_of_squares(grads: list[Tensor], device: torch.device) -> Tensor:
    if not grads:
        return torch.zeros((), device=device)
    by_device: dict[torch.device, list[Tensor]] = {}
    for grad in grads:  # CPU-offloaded shards are reduced where they live, then only the scalar moves
        by_device.setdefault(grad.device, []).append(grad)
    parts = [torch.nn.utils.get_total_norm(group).float().square().to(device) for group in by_device.values()]
    return torch.stack(parts).sum()


def global_grad_norm(parameters, device: torch.device | None = None, plain_grads_sharded: bool = False) -> Tensor:
    """L2 norm over all gradients, as `clip_grad_norm_` computes it, global across ranks (one all-reduce of
    a scalar when gradients are sharded). A 0-d fp32 tensor on `device` (default: the first gradient's
    device; 0 when there are no gradients, e.g. after a skipped step)."""
    parameters = list(parameters)
    if device is None:
        device = next((p.grad.device for p in parameters if p.grad is not None), torch.device("cpu"))
    sharded, replicated = local_squared_norms(parameters, device, plain_grads_sharded)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    return (sharded + replicated).sqrt()


def per_parameter_norms(named_parameters, device: torch.device, plain_grads_sharded: bool = False) -> dict[str, float]:
    """{name: global gradient norm} for every parameter with a gradient: one all-reduce of one vector of
    local squares (on `device`) and one host read, however many parameters."""
    named = [(name, p) for name, p in named_parameters if p.grad is not None]
    if not named:
        return {}
    reduce = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    world = dist.get_world_size() if reduce else 1
    squares = []
    for _, p in named:
        local = _local(p.grad).detach().float().square().sum().to(device)
        if is_dtensor(p.grad):
            squares.append(local / replicas(p.grad))  # a shard: 1 holder, or one per HSDP replica group
        else:  # replicated plain gradients: every rank adds its 1/world share
            squares.append(local if plain_grads_sharded else local / world)
    vector = torch.stack(squares).double()
    if reduce:
        dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return {name: value ** 0.5 for (name, _), value in zip(named, vector.tolist())}


def scale_gradients_(parameters, factor: float) -> None:
    """Multiply every gradient by a host number in place (one fused kernel per device and dtype)."""
    grads = [_local(p.grad) for p in parameters if p.grad is not None]
    if grads and factor != 1.0:
        torch._foreach_mul_(grads, factor)


def clip_by_total_norm_(parameters, max_norm: float, total_norm: float) -> None:
    """Scale gradients in place so that their global norm is at most `max_norm`, given that global norm
    (a host number every rank agrees on). Works on plain, FSDP1 (flat shards) and FSDP2 (DTensor)
    gradients alike: every rank scales its own shard by the same factor. Nothing happens below the limit,
    and the factor is a host number, so clipping adds no host sync."""
    coefficient = max_norm / (total_norm + 1e-6)
    if coefficient < 1.0:  # also False for a NaN norm: such a step is refused or skipped elsewhere
        scale_gradients_(parameters, coefficient)


def unscale_fused_(scaler, optimizer) -> None:
    """fp16 (`16-mixed`): unscale the gradients of an optimizer that unscales inside `step()` (fused AdamW),
    which Lightning leaves scaled. Call it once per step, before reading the gradients: the norm, the
    clipping and any skip then see true gradients, and GradScaler has recorded its inf check (its
    `update()` fails without one, even when the gradients are dropped afterwards). No-op without a scaler."""
    if scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
        scaler.unscale_(optimizer)
