"""Optimizer parameter groups and learning-rate schedules.

Weight decay goes on the 2-D weight matrices of linear layers only (q/k/v/o, gate/up/down,
lm_head). No decay on:
- norm weights (RMSNorm, DIFF V1's subln): they set a scale, decaying them pulls it towards 0;
- lambda parameters (DIFF V2's lambda_proj, DIFF V1's lambda_q1/k1/q2/k2): a handful of gating
  parameters per layer whose value is the mechanism; docs/design.md section 6;
- embeddings (a choice, as in Llama/OLMo-style recipes): each row only gets gradient when its token
  appears, so decay would shrink rare tokens towards zero between their updates. With tied
  embeddings the shared matrix is an embedding and is not decayed either.

`model.optimizer: muon` moves the blocks' 2-D matrices (q/k/v/o, gate/up/down; `muon_parameter_names`) into
a third group that Muon steps (training/muon.py) with `muon_lr` and `muon_weight_decay`; AdamW keeps the
embeddings, the output layer, the norms and the lambdas (DIFF V2's `lambda_proj` is a [h, D] matrix but a
gate, not a hidden layer: kept off Muon).
"""

from __future__ import annotations

import math
from typing import Literal

from torch import nn

# Linear layers whose weight is a lambda (gate) and therefore never decayed.
NO_DECAY_LINEARS = ("lambda_proj",)

ScheduleName = Literal["cosine", "wsd", "constant"]
OptimizerName = Literal["adamw", "muon"]


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names (as in `model.named_parameters()`) of the parameters that get weight decay."""
    names = set()
    for module_name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module_name.split(".")[-1] in NO_DECAY_LINEARS:
            continue
        if module.weight.ndim == 2:
            names.add(f"{module_name}.weight" if module_name else "weight")
    return names


def muon_parameter_names(model: nn.Module) -> set[str]:
    """The hidden matrices Muon steps: the 2-D weights of the linear layers inside the blocks (`layers.*`),
    except the lambda gates. Wrappers (activation checkpointing, compile) keep `layers` first in the names."""
    names = set()
    for module_name, module in model.named_modules():
        parts = module_name.split(".")
        if isinstance(module, nn.Linear) and parts[0] == "layers" and parts[-1] not in NO_DECAY_LINEARS \
                and module.weight.ndim == 2:
            names.add(f"{module_name}.weight")
    return names


def parameter_groups(model: nn.Module, weight_decay: float, muon: dict | None = None) -> list[dict]:
    """Two AdamW groups: decayed matrices and everything else (names kept for tests and logs). With `muon`
    (the Muon group's settings: lr, weight_decay, ...) a third group, `use_muon: True`, takes the blocks'
    matrices out of the first; the AdamW groups stay first (group 0 is the decayed one)."""
    decay_names = decay_parameter_names(model)
    muon_names = muon_parameter_names(model) if muon is not None else set()
    decay, no_decay, hidden = [], [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (hidden if name in muon_names else decay if name in decay_names else no_decay).append((name, param))
    groups = [
        {"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": weight_decay},
        {"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0},
    ]
    if muon is not None:
        groups.append({"params": [p for _, p in hidden], "names": [n for n, _ in hidden], "use_muon": True, **muon})
    return groups


def muon_settings(hparams) -> dict:
    """The Muon group's keys (MuonAdamW's group format) from DecoderLM's hyper-parameters."""
    return {"lr": hparams["muon_lr"], "weight_decay": hparams["muon_weight_decay"],
            "momentum": hparams["muon_momentum"], "nesterov": hparams["muon_nesterov"],
            "ns_steps": hparams["muon_ns_steps"], "adjust_lr_fn": hparams["muon_adjust_lr"]}


def check_muon(optimizer: str, muon_lr: float, muon_weight_decay: float, muon_momentum: float, muon_ns_steps: int,
               muon_adjust_lr: str, cpu_offload: bool = False) -> None:
    """The optimizer choice and Muon's settings, each refusal naming its key (checked for AdamW runs too, so a
    typo does not wait for the day the recipe switches to Muon)."""
    from diffv2_lit.training.muon import MUON_SCALES

    problems = []
    if optimizer not in ("adamw", "muon"):
        problems.append(f"model.optimizer={optimizer!r} is not one of: adamw, muon")
    if not muon_lr > 0:
        problems.append(f"model.muon_lr={muon_lr} must be > 0 (e.g. 0.02 with muon_adjust_lr: original)")
    if not muon_weight_decay >= 0:
        problems.append(f"model.muon_weight_decay={muon_weight_decay} must be >= 0")
    if not 0 <= muon_momentum < 1:
        problems.append(f"model.muon_momentum={muon_momentum} must be in [0, 1), e.g. 0.95")
    if isinstance(muon_ns_steps, bool) or not isinstance(muon_ns_steps, int) or not 1 <= muon_ns_steps < 100:
        problems.append(f"model.muon_ns_steps={muon_ns_steps!r} must be an integer in [1, 100), e.g. 5")
    if muon_adjust_lr not in MUON_SCALES:
        problems.append(f"model.muon_adjust_lr={muon_adjust_lr!r} is not one of: {', '.join(MUON_SCALES)}")
    if optimizer == "muon" and cpu_offload:
        problems.append("model.optimizer=muon cannot run with model.parallel.cpu_offload=true (Newton-Schulz gathers each "
                        "matrix on the accelerator): set one of them back")
    if problems:
        raise ValueError("; ".join(problems))


def check_same_optimizer(saved: dict, current: dict, where: str) -> None:
    """A resume keeps the optimizer: AdamW's state (two moments per parameter) cannot continue as Muon's (one
    buffer per matrix) or the reverse. Checkpoints from before `model.optimizer` existed are AdamW's."""
    from diffv2_lit.checkpoint.errors import ResumeError

    if not isinstance(saved.get("model_config"), dict):
        return  # not a diffv2-lit checkpoint: Lightning's own load reports what it finds
    before, now = saved.get("optimizer", "adamw"), current.get("optimizer", "adamw")
    if before != now:
        raise ResumeError(f"{where} was trained with model.optimizer={before} and this run uses {now}: resume with "
                         f"--model.optimizer {before}, or start {now} from its weights with --model.init_from")


def lr_multiplier(step: int, schedule: ScheduleName, max_steps: int, warmup_steps: int,
                  min_lr_ratio: float, decay_fraction: float) -> float:
    """Multiplier of the peak LR at optimizer step `step` (0-based).

    cosine:   linear warmup to 1, then cosine from 1 to min_lr_ratio at max_steps.
    wsd:      linear warmup, constant 1 (stable), then a linear decay to min_lr_ratio over the
              last `decay_fraction` of max_steps (warmup-stable-decay).
    constant: linear warmup, then 1.
    Past max_steps the multiplier stays at its final value.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    decay_start = max(warmup_steps, int(round(max_steps * (1.0 - decay_fraction))))
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
    return 1.0 - (1.0 - min_lr_ratio) * progress


def check_optimization(lr: float, betas, eps: float, weight_decay: float, schedule: str, warmup_steps: int,
                       min_lr_ratio: float, decay_fraction: float, max_steps: int | None = None) -> None:
    """Every optimizer and schedule value in one place, each refusal naming its key (`model.<name>`).

    torch's own checks would fire later, inside `configure_optimizers`, as a traceback, and some values it
    accepts train silently to nothing (lr=0) or to a schedule that never leaves its warm-up.
    """
    problems = []
    if not lr > 0:
        problems.append(f"model.lr={lr} must be > 0 (the peak learning rate, e.g. 3e-4)")
    if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
        problems.append(f"model.betas={list(betas)} must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if not eps > 0:
        problems.append(f"model.eps={eps} must be > 0, e.g. 1e-8")
    if not weight_decay >= 0:
        problems.append(f"model.weight_decay={weight_decay} must be >= 0")
    if schedule not in ("cosine", "wsd", "constant"):
        problems.append(f"model.schedule={schedule!r} is not one of: cosine, wsd, constant")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        problems.append(f"model.warmup_steps={warmup_steps!r} must be an integer >= 0")
    elif max_steps is not None and max_steps > 0 and warmup_steps >= max_steps:
        problems.append(f"model.warmup_steps={warmup_steps} must be below model.max_steps={max_steps}: the LR "
                        "would never leave its warm-up")
    if not 0 <= min_lr_ratio <= 1:
        problems.append(f"model.min_lr_ratio={min_lr_ratio} must be in [0, 1] (the final LR as a fraction of the peak)")
    if not 0 < decay_fraction <= 1:
        problems.append(f"model.decay_fraction={decay_fraction} must be in (0, 1] (wsd: the share of steps that decay)")
    if problems:
        raise ValueError("; ".join(problems))


SCHEDULE_FIELDS = ("schedule", "warmup_steps", "min_lr_ratio", "decay_fraction")
MUON_FIELDS = ("muon_lr", "muon_weight_decay", "muon_momentum", "muon_nesterov", "muon_ns_steps", "muon_adjust_lr")


def apply_optimizer_settings(optimizer, scheduler, saved: dict, current: dict, saved_schedule_steps: int | None,
                             schedule_steps: int) -> list[str]:
    """After a resume restored the checkpoint's optimizer (AdamW or MuonAdamW) and LambdaLR states, put this
    run's settings in place (the schedule's shape and length already come from this run's LambdaLR function)
    and set the LR for the resumed step. Returns one description per change."""
    muon = current.get("optimizer") == "muon"
    names = ("lr", "betas", "eps", "weight_decay") + SCHEDULE_FIELDS + (MUON_FIELDS if muon else ())
    changes = [f"model.{name} {current[name]!r} (the checkpoint's: {saved[name]!r})"
               for name in names if name in saved and _plain(saved[name]) != _plain(current[name])]
    decay_group = optimizer.param_groups[0]  # parameter_groups: the decayed matrices first
    decay_group["weight_decay"] = current["weight_decay"]
    lr_before = optimizer.param_groups[0]["lr"]
    for group in optimizer.param_groups:
        if group.get("use_muon"):
            group.update(muon_settings(current))
            group["initial_lr"] = current["muon_lr"]
        else:
            group["betas"], group["eps"], group["initial_lr"] = tuple(current["betas"]), current["eps"], current["lr"]
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, multiplier in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * multiplier(scheduler.last_epoch)
    if saved_schedule_steps is not None and saved_schedule_steps != schedule_steps:
        changes.append(f"an LR schedule of {schedule_steps} steps (the checkpoint's: {saved_schedule_steps}): the "
                       f"LR goes from {lr_before:.4g} to {optimizer.param_groups[0]['lr']:.4g}")
    return changes


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value
