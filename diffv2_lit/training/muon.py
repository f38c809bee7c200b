"""Muon for the blocks' weight matrices and AdamW for every other parameter, as one torch optimizer.

Muon (Keller Jordan, https://kellerjordan.github.io/posts/muon/) keeps a momentum buffer per matrix and
applies its Newton-Schulz orthogonalisation: `B = mu*B + (1-mu)*g` (torch's `lerp`), nesterov
`u = (1-mu)*g + mu*B` (else `u = B`), `O = NS5(u)`, `W -= lr*wd*W` (decoupled decay), `W -= lr*scale*O`.
The update follows `torch.optim.Muon` (torch >= 2.9) step for step, written out here because that class
is one more optimizer (Lightning's automatic optimization, clipping and LR scheduler want one), holds
2-D parameters only, is missing from older torch releases, and does not know DTensor shards.

One optimizer keeps everything else unchanged: one `param_groups` list (groups flagged `use_muon`) that
the LR scheduler multiplies, one state dict that checkpoints and resumes like AdamW's, one `zero_grad`.
The AdamW groups are stepped by a real `torch.optim.AdamW` (fused on CUDA) that shares this optimizer's
group dicts and state, so they compute exactly what `model.optimizer: adamw` would.

FSDP2: each matrix is a DTensor sharded on dim 0, and Newton-Schulz needs the whole matrix. The momentum
buffer stays a shard (elementwise work); the nesterov update is all-gathered per matrix (`full_tensor`),
every rank orthogonalises it, and keeps its own shard of the result (no second collective). Each rank thus
repeats every matrix's Newton-Schulz; torchtitan's and Dion's distributed Muon instead give each rank a
share of the matrices and all-gather the results (less compute, more code). Cost: benchmarks/bench_muon.py.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from diffv2_lit.gradients import is_dtensor

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, as torch.optim.Muon
NS_EPS = 1e-7
MuonScale = Literal["original", "match_rms_adamw", "spectral_unclamped"]
MUON_SCALES = ("original", "match_rms_adamw", "spectral_unclamped")
MUON_KEYS = ("momentum", "nesterov", "ns_steps", "adjust_lr_fn")  # a Muon group's settings besides lr and decay


def newton_schulz(matrix: Tensor, steps: int, coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                  eps: float = NS_EPS, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """The quintic Newton-Schulz iteration (an approximate U V^T of the SVD U S V^T), in bf16 as
    torch.optim.Muon's `_zeropower_via_newtonschulz`. It works on the wide orientation (fewer rows), so X X^T
    is the small Gram. Its slope at 0 (a = 3.4, ~470 after 5 steps) amplifies bf16 rounding along the small
    singular directions: two bf16 implementations agree to a few % on a full-rank matrix, not on a low-rank one."""
    a, b, c = coefficients
    x = matrix.to(dtype)
    tall = matrix.size(0) > matrix.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside the iteration's basin
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b*G + c*G^2
        x = torch.addmm(x, poly, x, beta=a)                     # a*X + (b*G + c*G^2) X
    return x.T if tall else x


def lr_scale(shape: torch.Size, rule: str) -> float:
    """torch.optim.Muon's `adjust_lr_fn` for a [fan_out, fan_in] weight: `original` (Keller Jordan's, and
    modded-nanogpt's) sqrt(max(1, out/in)); `match_rms_adamw` (Moonshot, "Muon is Scalable for LLM Training")
    0.2*sqrt(max(out, in)), an update of AdamW's RMS, so AdamW's LR and decay carry over; `spectral_unclamped`
    (Bernstein) sqrt(out/in)."""
    fan_out, fan_in = shape[:2]
    if rule == "original":
        return math.sqrt(max(1.0, fan_out / fan_in))
    if rule == "match_rms_adamw":
        return 0.2 * math.sqrt(max(fan_out, fan_in))
    if rule == "spectral_unclamped":
        return math.sqrt(fan_out / fan_in)
    raise ValueError(f"model.muon_adjust_lr={rule!r} is not one of: {', '.join(MUON_SCALES)}")


def orthogonalised(update: Tensor, steps: int, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """Newton-Schulz of a whole matrix; a DTensor shard is all-gathered first and its own shard kept."""
    if not is_dtensor(update):
        return newton_schulz(update, steps, dtype=dtype)
    from torch.distributed.tensor import DTensor, Replicate

    full = newton_schulz(update.full_tensor(), steps, dtype=dtype)
    mesh = update.device_mesh
    # Replicate -> the parameter's placements: each rank slices its own shard out, no communication.
    return DTensor.from_local(full, mesh, [Replicate()] * mesh.ndim, run_check=False).redistribute(
        mesh, update.placements)


class MuonAdamW(torch.optim.Optimizer):
    """Groups with `use_muon: True` get Muon (2-D parameters only); the others AdamW.

    A parameter whose `.grad` is None is skipped by both (the spike detector's skip drops the gradients).
    `ns_dtype`: Newton-Schulz's precision (bf16 as torch.optim.Muon; float32 for comparisons in tests). It is
    an attribute, not a group key, so that checkpoints hold plain values only.
    """

    def __init__(self, groups: list[dict], *, lr: float, betas: tuple[float, float], eps: float,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 adjust_lr_fn: MuonScale = "original", fused: bool | None = None,
                 ns_dtype: torch.dtype = torch.bfloat16) -> None:
        self.ns_dtype = ns_dtype
        adamw_groups = [g for g in groups if not g.get("use_muon")]
        muon_defaults = {"momentum": momentum, "nesterov": nesterov, "ns_steps": ns_steps,
                         "adjust_lr_fn": adjust_lr_fn}
        muon_groups = [{**muon_defaults, **g} for g in groups if g.get("use_muon")]
        for group in muon_groups:
            lr_scale(torch.Size([1, 1]), group["adjust_lr_fn"])  # an unknown rule fails here, not at step 1
            for p in group["params"]:
                if p.ndim != 2:
                    raise ValueError(f"Muon orthogonalises matrices; a parameter of shape {tuple(p.shape)} "
                                     "belongs in an AdamW group")
        # AdamW fills its groups' keys (betas, eps, fused, ...); this optimizer holds those same dicts.
        self._adamw = torch.optim.AdamW(adamw_groups, lr=lr, betas=betas, eps=eps, fused=fused) \
            if adamw_groups else None
        for group in self._adamw.param_groups if self._adamw else ():
            group["use_muon"] = False
        super().__init__([*(self._adamw.param_groups if self._adamw else ()), *muon_groups],
                         {"lr": lr, "weight_decay": 0.0})
        for group in self.param_groups:
            group.setdefault("use_muon", False)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # load_state_dict replaces the group dicts and the state: AdamW steps the current ones.
        if self._adamw is not None:
            self._adamw.param_groups = [g for g in self.param_groups if not g["use_muon"]]
            self._adamw.state = self.state
            self._adamw.step()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
        return loss

    def _muon_step(self, group: dict) -> None:
        lr, decay, momentum = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
            buffer = state["momentum_buffer"]
            buffer.lerp_(p.grad, 1 - momentum)
            update = p.grad.lerp(buffer, momentum) if group["nesterov"] else buffer
            update = orthogonalised(update, group["ns_steps"], self.ns_dtype)
            p.mul_(1 - lr * decay)
            p.add_(update.to(p.dtype), alpha=-lr * lr_scale(p.shape, group["adjust_lr_fn"]))
