"""Gradient-spike detection: the global gradient norm (and optionally the loss) against its own running level.

The detector judges in `on_before_optimizer_step`, once per optimizer step: on the last micro-batch of the
accumulation window, after fp16's unscale and before gradient clipping and the optimizer step. The norm it
judges is therefore the accumulated, unscaled, per-token gradient *before* clipping, and dropping the
gradients there (`p.grad = None`, action `skip`) makes the clip a no-op and the optimizer step skip every
parameter: the weights and their optimizer state (moments, step count) stay as they were
(`tests/callbacks/test_spike.py` checks both).

Spike rule: value > `factor` x level, or value > level + `z` x spread. Spiked values never enter the
running statistics. A non-finite gradient norm or loss is always a spike (except the gradient overflows
that fp16's GradScaler expects and skips by itself). The numbers are the module's step statistics
(`pl_module.step_result()`: the global gradient norm and the token-weighted mean loss, one collective and
one host sync per step that the module pays anyway), identical on every rank, so every rank takes the
same decision.

A lasting shift is not a spike: because spiked values never enter the statistics, a level that moves
for good (a resume with a smaller batch, a new data mixture) would be flagged at every later step, and
in `skip` mode every later step would be dropped while the LR schedule moves on. After
`max_consecutive` finite spikes in a row the detector therefore takes the recent values as the new
level (`on_persistent="rebaseline"`: statistics restart from them, warm-up again, one warning) or stops
with a checkpoint that resumes from the new level (`on_persistent="stop"`).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from diffv2_lit.callbacks.protocol import log_metrics
from diffv2_lit.gradients import global_grad_norm, per_parameter_norms, unscale_fused_

ACTIONS = ("log", "skip", "stop")
METHODS = ("ema", "median")
PERSISTENT_ACTIONS = ("rebaseline", "stop")


# ----------------------------------------------------------------------------------------------
# Running statistics of one positive signal
# ----------------------------------------------------------------------------------------------


class EmaStats:
    """Exponential moving mean and variance (West's incremental form); spread = sqrt(variance)."""

    method = "ema"

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.count, self.mean, self.var = 0, 0.0, 0.0

    def update(self, x: float) -> None:
        if self.count == 0:
            self.mean = x
        else:
            diff = x - self.mean
            self.mean += (1.0 - self.decay) * diff
            self.var = self.decay * (self.var + (1.0 - self.decay) * diff * diff)
        self.count += 1

    def level(self) -> float:
        return self.mean

    def spread(self) -> float:
        return math.sqrt(self.var)

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "count": self.count, "mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count, self.mean, self.var = int(state["count"]), float(state["mean"]), float(state["var"])


class MedianStats:
    """Median of the last `window` values; spread = 1.4826 x median absolute deviation (a robust std)."""

    method = "median"

    def __init__(self, window: int) -> None:
        self.values: deque[float] = deque(maxlen=window)
        self.count = 0

    def update(self, x: float) -> None:
        self.values.append(x)
        self.count += 1

    def level(self) -> float:
        return _median(list(self.values))

    def spread(self) -> float:
        level = self.level()
        return 1.4826 * _median([abs(v - level) for v in self.values])

    def state_dict(self) -> dict[str, Any]:
        return {"method": self.method, "count": self.count, "values": list(self.values)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values.clear()
        self.values.extend(float(v) for v in state["values"])
        self.count = int(state["count"])


def _median(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


# ----------------------------------------------------------------------------------------------
# Gradient norms (plain tensors and FSDP2 DTensor shards)
# ----------------------------------------------------------------------------------------------


def top_grad_norms(named_params: list[tuple[str, Tensor]], device: torch.device, plain_grads_sharded: bool = False,
                   k: int = 5) -> dict[str, list]:
    """The `k` parameters and the `k` blocks (`...layers.<i>`, or the top-level module) with the largest
    gradient norms. Called on every rank (one all-reduce under sharding), only when a spike is recorded."""
    norms = per_parameter_norms(named_params, device, plain_grads_sharded)
    blocks: dict[str, float] = {}
    for name, norm in norms.items():
        block = _block_name(name)
        blocks[block] = blocks.get(block, 0.0) + norm * norm
    return {
        "top_params": [[n, v] for n, v in sorted(norms.items(), key=_nan_last)[:k]],
        "top_blocks": [[n, math.sqrt(v)] for n, v in sorted(blocks.items(), key=_nan_last)[:k]],
    }


def _nan_last(item: tuple[str, float]) -> tuple[int, float]:
    """Sort key: non-finite norms first (they are the culprits), then largest first."""
    value = item[1]
    return (0, 0.0) if not math.isfinite(value) else (1, -value)


def _block_name(param_name: str) -> str:
    parts = param_name.split(".")
    if "layers" in parts:
        idx = parts.index("layers")
        return ".".join(parts[: idx + 2])
    return ".".join(parts[:-1]) or param_name


# ----------------------------------------------------------------------------------------------
# The callback
# ----------------------------------------------------------------------------------------------


class GradientSpikeDetector(L.Callback):
    """Flags optimizer steps whose global gradient norm (before clipping) spikes above its running level.

    Args:
        action: what to do on a spike: "log" (record it only), "skip" (drop the gradients: weights and
            optimizer state stay as they were; the LR schedule and `global_step` still advance), or
            "stop" (drop the gradients, save a checkpoint at the end of that step, stop training).
        factor: spike when value > factor x running level. None disables this test.
        z: spike when value > level + z x spread (EMA std or 1.4826 MAD). None disables this test.
        warmup: accepted values collected before any judging (non-finite values are judged from step 1).
        method: "ema" (moving mean/variance, `ema_decay`) or "median" (median/MAD of the last `window`).
        ema_decay: EMA weight of the past, in (0, 1); 0.98 forgets with a half-life of about 34 steps.
        window: values kept by the "median" method.
        min_rel_spread: the spread used by the z test is at least this fraction of the level, so a
            near-constant signal does not turn noise into spikes.
        watch_loss: also judge the training loss (same thresholds, its own statistics): the step's token-weighted
            mean from `pl_module.step_result()` (DecoderLM), else the mean of the micro-batches' losses.
        log_dir: folder of `spikes.jsonl` and stop checkpoints; default `trainer.log_dir`.
        top_k: how many parameters / blocks with the largest gradient norms each record lists.
        max_consecutive: this many finite spikes in a row mean the level itself has moved (see the
            module docstring); None never concludes so (not recommended with `skip`: it can drop every
            later step).
        on_persistent: then "rebaseline" (restart the statistics from the recent values and warn) or
            "stop" (rebaseline, save a checkpoint and stop, so a human can look before resuming).
    """

    def __init__(self, action: str = "log", factor: float | None = 4.0, z: float | None = 6.0, warmup: int = 50,
                 method: str = "ema", ema_decay: float = 0.98, window: int = 200, min_rel_spread: float = 0.05,
                 watch_loss: bool = False, log_dir: str | None = None, top_k: int = 5,
                 max_consecutive: int | None = 10, on_persistent: str = "rebaseline") -> None:
        super().__init__()
        _validate(action, factor, z, warmup, method, ema_decay, window, min_rel_spread, top_k)
        _validate_persistent(max_consecutive, on_persistent)
        self.max_consecutive, self.on_persistent = max_consecutive, on_persistent
        self.action, self.factor, self.z, self.warmup = action, factor, z, warmup
        self.method, self.ema_decay, self.window = method, ema_decay, window
        self.min_rel_spread, self.watch_loss, self.top_k = min_rel_spread, watch_loss, top_k
        self.log_dir = log_dir
        self._out_dir = log_dir or "."  # resolved in setup()
        self.grad_stats = self._new_stats()
        self.loss_stats = self._new_stats()
        self.steps_seen = 0      # optimizer steps observed
        self.count = 0           # spikes flagged
        self.nonfinite = 0       # of which non-finite
        self.overflows = 0       # fp16 GradScaler overflows (not spikes: the scaler skips those steps itself)
        self.max_ratio = 0.0     # largest finite value / level seen on a judged step
        self.last_spike_step: int | None = None
        self.last_grad_norm: float | None = None  # this step's global norm before clipping (all ranks agree)
        self.last_loss: float | None = None
        self.rebaselines = 0     # lasting shifts taken as the new level
        self._run: list[tuple[float, float | None]] = []  # (grad norm, loss) of the current run of finite spikes
        self._loss_sum: Tensor | None = None  # the fallback's loss (modules without step_result)
        self._stop_pending = False
        self._stop_reason = ""

    def _new_stats(self) -> EmaStats | MedianStats:
        return EmaStats(self.ema_decay) if self.method == "ema" else MedianStats(self.window)

    @property
    def state_key(self) -> str:
        return "GradientSpikeDetector"

    # ---- Lightning hooks ---------------------------------------------------------------------

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # trainer.log_dir is a collective (broadcast): resolve it here, where every rank runs.
        self._out_dir = self.log_dir or trainer.log_dir or trainer.default_root_dir

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor) -> None:
        if hasattr(pl_module, "step_result"):
            return  # the module knows the step's token-weighted loss
        # Lightning passes loss / accumulate_grad_batches (and times the loss scale under fp16): the sum
        # over the window's micro-batches is their mean loss once the scale is divided out.
        loss = loss.detach().float()
        self._loss_sum = loss if self._loss_sum is None else self._loss_sum + loss

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> None:
        grad_norm, loss = self._global_values(trainer, pl_module, optimizer)
        self.last_grad_norm, self.last_loss = grad_norm, loss
        self.steps_seen += 1
        ratio = self.current_ratio(grad_norm)  # against the level before this value enters it
        spike, shifted = self._observe(grad_norm, loss, trainer.global_step, _scaler(trainer) is not None)
        self._log_summary(trainer, ratio)
        if spike is None:
            return
        self._record(trainer, pl_module, optimizer, spike, grad_norm, loss)
        if self.action in ("skip", "stop"):
            _drop_gradients(optimizer)
        if self.action == "stop":
            self._request_stop(trainer, "spike")
        if shifted:
            self._report_shift(trainer, shifted)

    def _request_stop(self, trainer: L.Trainer, reason: str) -> None:
        self._stop_pending, self._stop_reason = True, reason
        trainer.should_stop = True

    # ---- lasting shifts ----------------------------------------------------------------------

    def _observe(self, grad_norm: float, loss: float | None, step: int, overflow_expected: bool
                 ) -> tuple[dict | None, str]:
        """Judge one optimizer step; returns (the spike or None, a message if the level has moved for good)."""
        spike = self._judge(grad_norm, loss, overflow_expected)
        if spike is None or spike["kind"].startswith("non_finite"):  # a NaN is a fault, never a new level
            return spike, ""
        self._run.append((grad_norm, loss))
        if self.max_consecutive is None or len(self._run) < self.max_consecutive:
            return spike, ""
        return spike, self._rebaseline(step)

    def _rebaseline(self, step: int) -> str:
        """Restart the statistics from the run of consecutive spikes; returns what happened, in words."""
        old_level, run_length = self.grad_stats.level(), len(self._run)
        self.grad_stats, self.loss_stats = self._new_stats(), self._new_stats()
        for grad_norm, loss in self._run:
            self.grad_stats.update(grad_norm)
            if loss is not None:
                self.loss_stats.update(loss)
        self._run = []
        self.rebaselines += 1
        return (f"GradientSpikeDetector: the gradient norm stayed above the spike threshold for {run_length} "
                f"consecutive steps (level {old_level:.4g} -> {self.grad_stats.level():.4g} by step {step}): a "
                f"lasting shift, not a spike. The statistics restart from the recent values (warm-up "
                f"{self.warmup} steps)")

    def _report_shift(self, trainer: L.Trainer, message: str) -> None:
        if self.on_persistent == "stop":
            self._request_stop(trainer, "shift")
            rank_zero_warn(message + "; stopping, as on_persistent='stop' asks.")
        else:
            rank_zero_warn(message + ". If the run is diverging, lower the LR or set on_persistent='stop'.")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        # The stop checkpoint is written here, at the end of the (skipped) step, where ModelCheckpoint
        # also saves: loop counters are consistent and a resumed run continues with the next batch.
        if not self._stop_pending:
            return
        self._stop_pending = False
        path = os.path.join(self._out_dir, f"spike-stop-step{self.last_spike_step:08d}.ckpt")
        trainer.save_checkpoint(path, weights_only=False)  # the full state (Lightning warns when it is left unset)
        what = ("spike" if self._stop_reason == "spike"
                else "lasting shift of the gradient norm (statistics restarted from the new level)")
        rank_zero_info(f"GradientSpikeDetector: {what} at step {self.last_spike_step}; saved {path} and stopping. "
                       f"Resume with `ckpt_path={path!r}` (see {self._jsonl_path()}).")

    # ---- measuring ---------------------------------------------------------------------------

    def _global_values(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer) -> tuple[float, float | None]:
        """(grad norm, mean loss of the step), identical on every rank."""
        if hasattr(pl_module, "step_result"):  # DecoderLM: computed once per step (unscaled, per-token), shared
            result = pl_module.step_result()
            return result.grad_norm, result.loss
        # Another LightningModule: the norm and the mean of the micro-batch losses, one all-reduce and one host
        # sync of their own (plus one all-reduce of a scalar for sharded gradients).
        scaler = _scaler(trainer)
        unscale_fused_(scaler, optimizer)  # before the norm, and before a skip drops the gradients
        device = trainer.strategy.root_device
        norm = global_grad_norm([p for group in optimizer.param_groups for p in group["params"]], device=device)
        loss = self._loss_sum if self._loss_sum is not None else torch.tensor(0.0)
        if scaler is not None:
            loss = loss / scaler.get_scale()
        has_loss, self._loss_sum = self._loss_sum is not None, None
        pair = trainer.strategy.reduce(torch.stack([norm.float(), loss.float().to(device)]), reduce_op="mean")
        grad_norm, loss_value = pair.tolist()
        return grad_norm, (loss_value if has_loss else None)

    def _judge(self, grad_norm: float, loss: float | None, overflow_expected: bool) -> dict | None:
        """Returns the spike's description, or None; feeds accepted values into the statistics."""
        if loss is not None and not math.isfinite(loss):
            return {"kind": "non_finite_loss", "value": loss, "level": self.loss_stats.level(), "ratio": math.inf}
        if not math.isfinite(grad_norm):
            if overflow_expected:  # fp16: GradScaler skips this step and lowers its scale; not the model's fault
                self.overflows += 1
                return None
            return {"kind": "non_finite_grad_norm", "value": grad_norm, "level": self.grad_stats.level(),
                    "ratio": math.inf}
        spike = self._check("grad_norm", grad_norm, self.grad_stats)
        if spike is None and self.watch_loss and loss is not None:
            spike = self._check("loss", loss, self.loss_stats)
        if spike is None:
            self._run = []
            self.grad_stats.update(grad_norm)
            if loss is not None:
                self.loss_stats.update(loss)
        return spike

    def _check(self, kind: str, value: float, stats: EmaStats | MedianStats) -> dict | None:
        if stats.count < self.warmup or stats.level() <= 0:
            return None
        level = stats.level()
        spread = max(stats.spread(), self.min_rel_spread * level)
        ratio, zscore = value / level, (value - level) / spread
        if kind == "grad_norm":
            self.max_ratio = max(self.max_ratio, ratio)
        if (self.factor is not None and ratio > self.factor) or (self.z is not None and zscore > self.z):
            return {"kind": kind, "value": value, "level": level, "spread": spread, "ratio": ratio, "zscore": zscore}
        return None

    # ---- reporting ---------------------------------------------------------------------------

    def per_1k_steps(self) -> float:
        return 1000.0 * self.count / max(self.steps_seen, 1)

    def current_ratio(self, value: float) -> float:
        level = self.grad_stats.level()
        return value / level if level > 0 and math.isfinite(value) else float("nan")

    def _log_summary(self, trainer: L.Trainer, ratio: float) -> None:
        # Host numbers straight to the loggers, every `log_every_n_steps` like the loss.
        step = trainer.global_step
        if not trainer.log_every_n_steps or (step + 1) % trainer.log_every_n_steps:
            return
        metrics = {"spike/ratio": ratio} if math.isfinite(ratio) else {}
        log_metrics(trainer, {
            **metrics,
            "spike/count": float(self.count),
            "spike/per_1k_steps": self.per_1k_steps(),
            "spike/max_ratio": self.max_ratio,
            "spike/skipped": float(self.count if self.action != "log" else 0),
        }, step)

    def _record(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer, spike: dict,
                grad_norm: float, loss: float | None) -> None:
        self.count += 1
        self.nonfinite += spike["kind"].startswith("non_finite")
        step = trainer.global_step  # index of the optimizer step being judged (before it is taken)
        self.last_spike_step = step
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        named = [(n, p) for n, p in pl_module.named_parameters() if id(p) in owned]
        entry = {"step": step, **spike, "grad_norm": grad_norm, "loss": loss,
                 "lr": optimizer.param_groups[0].get("lr"), "action": self.action,
                 **top_grad_norms(named, trainer.strategy.root_device, _grads_sharded(trainer), self.top_k),
                 "time": time.time()}
        if not trainer.is_global_zero:
            return
        with open(self._jsonl_path(), "a") as f:
            f.write(json.dumps(_jsonable(entry)) + "\n")
        event = {"spike/event": 1.0}
        if math.isfinite(spike["ratio"]):
            event["spike/event_ratio"] = spike["ratio"]
        log_metrics(trainer, event, step)  # at the spike's own step, whatever log_every_n_steps is
        rank_zero_warn(f"GradientSpikeDetector: {spike['kind']} spike at step {step}: value {spike['value']:.4g}, "
                       f"level {spike['level']:.4g}, action {self.action!r}")

    def _jsonl_path(self) -> str:
        os.makedirs(self._out_dir, exist_ok=True)
        return os.path.join(self._out_dir, "spikes.jsonl")

    # ---- checkpointing -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": 2, "grad_stats": self.grad_stats.state_dict(), "loss_stats": self.loss_stats.state_dict(),
            "steps_seen": self.steps_seen, "count": self.count, "nonfinite": self.nonfinite,
            "overflows": self.overflows, "max_ratio": self.max_ratio, "last_spike_step": self.last_spike_step,
            "rebaselines": self.rebaselines, "run": [list(pair) for pair in self._run],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for key in ("steps_seen", "count", "nonfinite", "overflows", "max_ratio", "last_spike_step"):
            setattr(self, key, state_dict[key])
        self.rebaselines = state_dict.get("rebaselines", 0)  # version 1 checkpoints have no run tracking
        self._run = [(float(g), None if loss is None else float(loss)) for g, loss in state_dict.get("run", [])]
        for key in ("grad_stats", "loss_stats"):
            saved = state_dict[key]
            if saved["method"] != self.method:
                rank_zero_warn(f"GradientSpikeDetector: checkpoint statistics use method={saved['method']!r}, this "
                               f"run uses {self.method!r}; starting the statistics afresh (warm-up again).")
                continue
            getattr(self, key).load_state_dict(saved)


def _validate(action, factor, z, warmup, method, ema_decay, window, min_rel_spread, top_k) -> None:
    if action not in ACTIONS:
        raise ValueError(f"GradientSpikeDetector: action={action!r} is unknown; choose one of {ACTIONS}.")
    if method not in METHODS:
        raise ValueError(f"GradientSpikeDetector: method={method!r} is unknown; choose one of {METHODS}.")
    if factor is None and z is None:
        raise ValueError("GradientSpikeDetector: factor and z are both None, so nothing could ever be a spike; "
                         "set at least one (e.g. factor=4.0).")
    if factor is not None and not factor > 1:
        raise ValueError(f"GradientSpikeDetector: factor={factor!r} must be > 1 (a multiple of the running level).")
    if z is not None and not z > 0:
        raise ValueError(f"GradientSpikeDetector: z={z!r} must be > 0 (standard deviations above the level).")
    for name, value in (("warmup", warmup), ("window", window), ("top_k", top_k)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "warmup" else 1):
            raise ValueError(f"GradientSpikeDetector: {name}={value!r} must be an integer >= "
                             f"{0 if name == 'warmup' else 1}.")
    if not 0 < ema_decay < 1:
        raise ValueError(f"GradientSpikeDetector: ema_decay={ema_decay!r} must be in (0, 1), e.g. 0.98.")
    if not min_rel_spread >= 0:
        raise ValueError(f"GradientSpikeDetector: min_rel_spread={min_rel_spread!r} must be >= 0.")


def _validate_persistent(max_consecutive, on_persistent) -> None:
    if max_consecutive is not None and (isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int)
                                        or max_consecutive < 1):
        raise ValueError(f"GradientSpikeDetector: max_consecutive={max_consecutive!r} must be an integer >= 1 or None.")
    if on_persistent not in PERSISTENT_ACTIONS:
        raise ValueError(f"GradientSpikeDetector: on_persistent={on_persistent!r} is unknown; choose one of "
                         f"{PERSISTENT_ACTIONS}.")


def _scaler(trainer: L.Trainer):
    """fp16's GradScaler when the precision plugin has one (None for fp32 / bf16)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _grads_sharded(trainer: L.Trainer) -> bool:
    """FSDP1 keeps flat shards as plain tensors (FSDP2 shards are DTensors, recognised by type)."""
    from lightning.pytorch.strategies import FSDPStrategy

    return isinstance(trainer.strategy, FSDPStrategy)


def _drop_gradients(optimizer) -> None:
    """Setting grads to None (not zero) makes optimizer.step skip the parameters entirely: zeroed grads
    would still decay Adam's moments, advance its step count and apply weight decay."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def _jsonable(value):
    """json.dumps writes NaN/Infinity, which strict JSON readers refuse: store them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value
