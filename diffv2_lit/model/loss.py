"""The output layer and the cross-entropy in one step, so the full logits need not exist at once.

Shape legend
    N  tokens (batch x sequence, flattened)     D  model width     V  vocabulary

At the 125m shape a micro-batch of 16 x 2048 tokens has [32768, 50304] logits: 6.6 GB in fp32, and as much
again for their gradient. Three implementations of the same sum of token losses (targets equal to
`IGNORE_INDEX` count for nothing):

- `plain`: logits = hidden @ weight.T, then an fp32 cross-entropy. The reference; materialises [N, V].
- `chunked`: the same per chunk of `chunk_size` tokens, computing the gradients of each chunk in the
  forward pass (a chunk's softmax minus its one-hot is its logits' gradient), so only [chunk, V] ever
  exists. Plain PyTorch, any device; no recomputation, so no extra matmul.
- `liger`: liger-kernel's `LigerFusedLinearCrossEntropyLoss` (Triton, CUDA only, an optional extra), the
  same idea in fused kernels. Imported only when chosen.

Without a gradient to compute (validation: no_grad or inference mode), `chunked` and `liger` run the chunks
forward only: one matmul per chunk, no gradient buffers.

`auto` is `liger` on CUDA when liger-kernel is installed, else `plain`: `resolve_loss_impl` decides it once
for a device (`DecoderLM.configure_model`), and `linear_cross_entropy` takes only the resolved names, so no
step asks again.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
LOSS_IMPLS = ("auto", "plain", "chunked", "liger")
RESOLVED_LOSS_IMPLS = ("plain", "chunked", "liger")


@functools.cache
def liger_available() -> bool:
    """The one availability check for the optional liger-kernel (never imported at top level); asked once
    per process, not in every training step's loss."""
    return importlib.util.find_spec("liger_kernel") is not None


def resolve_loss_impl(requested: str, device: torch.device) -> str:
    """The implementation `requested` runs as on `device`: `auto` becomes liger or plain; liger where it cannot
    run is refused."""
    if requested not in LOSS_IMPLS:
        raise ValueError(f"loss_impl={requested!r} is unknown; choose one of {LOSS_IMPLS}.")
    if requested == "auto":
        return "liger" if device.type == "cuda" and liger_available() else "plain"
    if requested == "liger" and not (device.type == "cuda" and liger_available()):
        raise ValueError("loss_impl='liger' needs CUDA and liger-kernel (`pip install liger-kernel`); use "
                         "'chunked' for the same memory saving in plain PyTorch, or 'auto'.")
    return requested


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, impl: str = "plain",
                         chunk_size: int = 4096, z_loss: float = 0.0) -> Tensor:
    """Sum over tokens of -log softmax(hidden @ weight.T)[target]: hidden [N, D], weight [V, D], targets [N].
    With `z_loss` > 0, each counted token adds z_loss * logsumexp(logits)^2 (PaLM's z-loss; liger's
    `lse_square_scale`), so the mean over tokens carries the coefficient times the mean squared log-normaliser.

    `impl` is a resolved name (plain, chunked, liger: `resolve_loss_impl` turns `auto` into one, once).
    Returns a 0-d tensor in fp32 (fp64 for fp64 inputs); divide by the number of counted tokens for the mean.
    """
    if impl not in RESOLVED_LOSS_IMPLS:
        raise ValueError(f"loss impl {impl!r} is not one of {RESOLVED_LOSS_IMPLS}: resolve it once for the device "
                         "first (resolve_loss_impl).")
    if impl == "plain":
        logits = _at_least_fp32(F.linear(hidden, weight))
        loss = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        if z_loss:
            loss = loss + z_loss * (torch.logsumexp(logits, -1).square() * (targets != IGNORE_INDEX)).sum()
        return loss
    dtype = _compute_dtype(hidden, weight)
    if not _gradient_wanted(hidden, weight):
        # Validation runs under no_grad / inference mode, where the output weight is still a Parameter with
        # requires_grad=True: both fused paths would compute a [V, D] gradient and two more matmuls per chunk
        # for nothing. The forward-only chunks give the same sum with one matmul per chunk.
        return _chunked_loss(hidden.to(dtype), weight.to(dtype), targets, chunk_size, z_loss)
    if impl == "chunked":
        return _ChunkedLinearCrossEntropy.apply(hidden.to(dtype), weight.to(dtype), targets, chunk_size, z_loss)
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss

    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="sum", lse_square_scale=z_loss)
    return loss(weight.to(dtype), hidden.to(dtype), targets).float()


def _gradient_wanted(hidden: Tensor, weight: Tensor) -> bool:
    """Whether autograd will record this loss: grad mode on (off under no_grad and inference mode) and an
    input that requires a gradient."""
    return torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)


def _chunked_loss(hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, z_loss: float = 0.0) -> Tensor:
    """Forward only: the summed loss, [chunk, V] logits at a time, no gradient computed or kept."""
    total = torch.zeros((), dtype=torch.promote_types(weight.dtype, torch.float32), device=hidden.device)
    for start in range(0, hidden.shape[0], chunk_size):
        chunk = slice(start, start + chunk_size)
        total += _chunk_loss_and_grad(hidden[chunk], weight, targets[chunk], need_grad=False, z_loss=z_loss)[0]
    return total


def _at_least_fp32(logits: Tensor) -> Tensor:
    """bf16/fp16 logits lose the small probabilities: the softmax runs in fp32 (fp64 stays fp64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype `F.linear` would compute in: autocast's, else the inputs' (the custom autograd Function
    below runs outside autocast's reach, so it is applied by hand)."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, chunk_size: int, z_loss: float = 0.0) -> Tensor:
        need_grad = hidden.requires_grad or weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_grad else None
        wide = torch.promote_types(weight.dtype, torch.float32)
        grad_weight = torch.zeros(weight.shape, dtype=wide, device=weight.device) if need_grad else None
        total = torch.zeros((), dtype=wide, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_size):
            chunk = slice(start, start + chunk_size)
            loss, grad_logits = _chunk_loss_and_grad(hidden[chunk], weight, targets[chunk], need_grad, z_loss)
            total += loss
            if need_grad:
                grad_hidden[chunk] = grad_logits @ weight
                grad_weight += grad_logits.t() @ hidden[chunk]
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if need_grad else None)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_output.to(grad_hidden.dtype)
        return grad_hidden * scale, grad_weight * scale.to(grad_weight.dtype), None, None, None


def _chunk_loss_and_grad(hidden: Tensor, weight: Tensor, targets: Tensor, need_grad: bool, z_loss: float = 0.0
                         ) -> tuple[Tensor, Tensor | None]:
    """Summed loss of one chunk [c, D] and the gradient of that sum with respect to its logits [c, V]."""
    logits = _at_least_fp32(hidden @ weight.t())
    counted = targets != IGNORE_INDEX
    safe_targets = targets.clamp(min=0)
    log_norm = torch.logsumexp(logits, dim=-1)
    target_logits = logits.gather(1, safe_targets[:, None]).squeeze(1)
    loss = ((log_norm - target_logits + z_loss * log_norm.square()) * counted).sum()
    if not need_grad:
        return loss, None
    grad = torch.exp_(logits.sub_(log_norm[:, None]))  # softmax, in place of the logits
    if z_loss:  # d(z lse^2)/d logits = 2 z lse softmax
        grad.mul_((1.0 + 2.0 * z_loss * log_norm)[:, None])
    grad[torch.arange(len(targets), device=grad.device), safe_targets] -= 1.0
    grad.mul_(counted[:, None])
    return loss, grad.to(hidden.dtype)
