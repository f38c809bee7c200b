"""Optional fused kernels for RMSNorm and SwiGLU, swapped in from outside the model, like compile.

`kernels="torch"` (the default) keeps the PyTorch ops of norm.py and transformer.py, which torch.compile
fuses with their neighbours when `compile` is on. `kernels="liger"` runs liger-kernel's Triton kernels
instead (CUDA only, the optional `liger` extra), so the two can be measured against each other
(`benchmarks/gpu_suite.py --sections ablation`) and checked against each other (its `kernels` section).

The swap changes a module's class to a subclass whose only difference is `forward`: the parameters, their
names and the state-dict are untouched, so checkpoints, exports and FSDP sharding do not notice.
RoPE stays in PyTorch: it is two multiplies and an add that compile fuses into the projection's epilogue,
and liger's RoPE wants HF's [B, H, T, d] layout where this model keeps [B, T, H, d].

One difference in dtype, harmless for training: with bf16 activations and an fp32 weight (which autocast
never produces here: the residual stream stays fp32), liger's RMSNorm returns bf16 where the PyTorch one
promotes to fp32.
"""

from __future__ import annotations

from torch import Tensor, nn

from diffv2_lit.model.loss import liger_available
from diffv2_lit.model.norm import RMSNorm
from diffv2_lit.model.transformer import SwiGLU

KERNELS = ("torch", "liger")


def kernels_problem(kernels: str, device_type: str) -> str | None:
    """Why `kernels` cannot run on `device_type`, naming what to change; None when it can."""
    if kernels not in KERNELS:
        return f"model.kernels={kernels!r} is not one of: {', '.join(KERNELS)}"
    if kernels == "liger" and device_type != "cuda":
        return (f"model.kernels='liger' runs Triton kernels on CUDA only, and this run is on {device_type}; "
                "use model.kernels=torch (the default)")
    if kernels == "liger" and not liger_available():
        return ("model.kernels='liger' needs liger-kernel: pip install 'diffv2-lit[liger]' "
                "(or use model.kernels=torch, the default)")
    return None


class LigerRMSNorm(RMSNorm):
    """RMSNorm in one Triton kernel; "llama" casting mode is norm.py's rule (fp32 statistics, cast back,
    then scale)."""

    def forward(self, x: Tensor) -> Tensor:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        # offset 0, casting "llama", not in place (in place would overwrite the incoming gradient)
        return LigerRMSNormFunction.apply(x, self.weight, self.eps, 0.0, "llama", False)


class LigerSwiGLU(SwiGLU):
    """SwiGLU with silu(gate) * up in one Triton kernel (the three projections stay cuBLAS matmuls)."""

    def forward(self, x: Tensor) -> Tensor:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        return self.down_proj(LigerSiLUMulFunction.apply(self.gate_proj(x), self.up_proj(x)))


SWAPS = {RMSNorm: LigerRMSNorm, SwiGLU: LigerSwiGLU}


def use_kernels(model: nn.Module, kernels: str) -> int:
    """Swaps every RMSNorm and SwiGLU of `model` for its `kernels` version, in place; returns how many.

    Call it before sharding and compiling (it changes forwards, not parameters). `torch` swaps nothing.
    """
    if kernels == "torch":
        return 0
    swapped = 0
    for module in model.modules():
        fused = SWAPS.get(type(module))
        if fused is not None:
            module.__class__ = fused
            swapped += 1
    return swapped
