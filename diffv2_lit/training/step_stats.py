"""One optimizer step's numbers, reduced over ranks in one collective and read on the host once.

A training step needs a few global numbers: the count of counted tokens (to normalise the gradient per
token), the summed loss (to log the token-weighted mean), the gradient norm (to log it, clip by it and
judge spikes), and flags that any rank may raise (a preemption signal). Reducing and reading each on its
own costs a collective and a host sync apiece, and every host sync drains the GPU's launch queue. Here
they travel in one fp64 vector:

    [tokens, loss sum, squared norm of the sharded gradients, flag 1, flag 2, ...]

one `all_reduce(SUM)` (none on one process) and one `tolist()`. Everything else in the step (the
per-token normalisation, clipping, the spike decision, the non-finite guard, logging, preemption) uses
the host numbers of `StepResult`.

Per-token normalisation: each micro-batch backpropagates its summed loss divided by a constant (the
micro-batch's capacity, fixed for the run), Lightning divides by the accumulation, DDP / FSDP average
over ranks; the gradient is therefore `sum of token gradients x 1 / (A x W x capacity)`, and multiplying
it by `A x W x capacity / tokens` gives the mean over every counted token of the step (all micro-batches,
all ranks) whatever each micro-batch counted. With packed sequences (every token counted) the factor is
exactly 1 and nothing is multiplied.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from diffv2_lit.gradients import local_squared_norms, scale_gradients_


@dataclass(frozen=True)
class StepResult:
    """The host numbers of one optimizer step, identical on every rank."""

    step: int
    tokens: int           # counted (non-ignored) target tokens, all micro-batches and ranks
    loss: float           # their mean cross-entropy (nats/token)
    grad_norm: float      # global norm of the per-token gradient, before clipping
    flags: dict[str, bool] = field(default_factory=dict)  # True when any rank raised it


class StepStatistics:
    """Collects a step's micro-batches on the device; `finish` reduces, reads and normalises once."""

    def __init__(self) -> None:
        self._loss_sum: Tensor | None = None
        self._tokens: Tensor | None = None
        self._capacity: int | None = None
        self._flag_sources: dict[str, Callable[[], bool]] = {}
        self._flags: dict[str, Tensor] = {}

    def loss_for_backward(self, loss_sum: Tensor, counted: Tensor, capacity: int) -> Tensor:
        """Record one micro-batch (its summed loss and counted tokens, device tensors) and return what to
        backpropagate: the sum over a constant, so gradients can be made per-token afterwards."""
        if self._capacity is None:
            self._capacity = capacity  # the first micro-batch of this process; constant from then on
        detached = loss_sum.detach().double()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        counted = counted.double()
        self._tokens = counted if self._tokens is None else self._tokens + counted
        return loss_sum / self._capacity

    def add_flag(self, name: str, source: Callable[[], bool]) -> None:
        """A host condition any rank may raise (checked at every step's end, reduced with the rest)."""
        self._flag_sources[name] = source

    def finish(self, step: int, parameters: list, device: torch.device, accumulation: int, world_size: int,
               plain_grads_sharded: bool = False) -> StepResult:
        """Reduce the step's numbers (one collective), read them (one host sync), make the gradients
        per-token in place, and forget the micro-batches. `world_size` is the number of ranks the
        gradients are averaged over (DDP, FSDP1 and FSDP2 all average)."""
        sharded_sq, replicated_sq = local_squared_norms(parameters, device, plain_grads_sharded)
        reduce = world_size > 1 and dist.is_available() and dist.is_initialized()
        # Every rank holds the same replicated square: its share 1/W sums back to it over the ranks.
        squares = sharded_sq.double() + replicated_sq.double() / (world_size if reduce else 1)
        zero = torch.zeros((), dtype=torch.float64, device=device)
        flags = [self._flag(name, device) for name in self._flag_sources]
        vector = torch.stack([_on(self._tokens, zero, device), _on(self._loss_sum, zero, device), squares, *flags])
        if reduce:
            dist.all_reduce(vector, op=dist.ReduceOp.SUM)
        tokens, loss_sum, squared_norm, *raised = vector.tolist()  # the step's one host sync
        for flag, was_raised in zip(flags, raised):
            if was_raised:
                flag.zero_()
        capacity, self._loss_sum, self._tokens = self._capacity or 1, None, None
        scale = accumulation * world_size * capacity / max(tokens, 1.0)
        scale_gradients_(parameters, scale)  # per-token gradients (a no-op when every token counted)
        return StepResult(step=step, tokens=int(tokens), loss=loss_sum / max(tokens, 1.0),
                          grad_norm=scale * squared_norm ** 0.5,
                          flags={name: value > 0 for name, value in zip(self._flag_sources, raised)})

    def _flag(self, name: str, device: torch.device) -> Tensor:
        """The flag's device slot, set from its host source with `fill_` (a kernel, not a copy: no sync)."""
        slot = self._flags.get(name)
        if slot is None or slot.device != device:
            slot = self._flags[name] = torch.zeros((), dtype=torch.float64, device=device)
        if self._flag_sources[name]():
            slot.fill_(1.0)
        return slot


def _on(value: Tensor | None, zero: Tensor, device: torch.device) -> Tensor:
    return zero if value is None else value.to(device)
