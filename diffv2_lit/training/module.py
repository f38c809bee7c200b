"""`DecoderLM`: the LightningModule that trains a `Transformer` (any attention variant).

The decoder returns the summed fp32 cross-entropy (fused with its output layer, `model/loss.py`); this
module normalises it per token over the optimizer step and logs it. Optimizer and schedule are built in
`configure_optimizers` from typed `__init__` arguments (LightningCLI's automatic optimizer would
build from `model.parameters()` before FSDP wraps them). The model is built in `configure_model()`
on the meta device, parallelised from outside (`parallelize`), materialised and initialised once.

YAML shape (LightningCLI):

    model:
      architecture: {preset: 125m, attention: baseline}   # a preset plus any ModelConfig field
      parallel: {activation_checkpointing: true, compile: true}   # training/parallel.py: ParallelSettings
      lr: 6.0e-4
      schedule: cosine
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Callable
from typing import Any, Literal

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn
import torch
from torch import Tensor

from diffv2_lit.errors import DiffV2Error, UsageError
from diffv2_lit.model import Architecture, Transformer, resolve_model_config
from diffv2_lit.model.fused import KERNELS, kernels_problem, use_kernels
from diffv2_lit.model.loss import IGNORE_INDEX, LOSS_IMPLS, resolve_loss_impl
from diffv2_lit.checkpoint.atomic_io import MarkShardedSaves
from diffv2_lit.checkpoint.errors import CheckpointError
from diffv2_lit.gradients import clip_by_total_norm_, unscale_fused_
from diffv2_lit.training.float8 import all_gathers_in_float8, float8_problem, precompute_scales
from diffv2_lit.training.handshake import check_data_fits_model
from diffv2_lit.training.muon import MuonAdamW, MuonScale
from diffv2_lit.training.optim import (OptimizerName, ScheduleName, apply_optimizer_settings, check_muon,
                                      check_optimization, check_same_optimizer, lr_multiplier, muon_settings,
                                      parameter_groups)
from diffv2_lit.training.parallel import ParallelSettings, parallelize
from diffv2_lit.training.step_stats import StepResult, StepStatistics



RESUME_KEY = "diffv2_lit"  # the checkpoint's entry for what a resume compares (the schedule's length)


class DivergedError(DiffV2Error, RuntimeError):
    """A non-finite gradient about to be applied: training stops before the weights turn NaN."""

    def __init__(self, step: int, grad_norm: float, last_good: str | None) -> None:
        where = (f"the last good checkpoint is {last_good} (--ckpt_path {last_good} --model.lr LOWER resumes from "
                 "it with a lower LR)") if last_good else \
            "no checkpoint was written before it"
        super().__init__(f"training diverged at step {step}: the gradient norm is {grad_norm} (the loss is not "
                         f"finite); the weights were not updated with it and nothing was saved after it; {where}. "
                         "Lower model.lr, or let GradientSpikeDetector(action: skip) drop such steps.")
        self.step, self.last_good = step, last_good


def _last_good_checkpoint(trainer: L.Trainer) -> str | None:
    callback = trainer.checkpoint_callback
    path = getattr(callback, "last_model_path", "") or getattr(callback, "best_model_path", "")
    return path or None


def _share_from_rank_zero(model: torch.nn.Module) -> None:
    """Every rank takes rank 0's initial weights where they are whole tensors (a CPU mesh initialises before
    sharding; DDP and FSDP1 initialise full copies). Each rank drew them from its own RNG state, which need not
    agree (anything that consumed random numbers on one rank only, before the model was built), and a sharded
    model made of shards of different initialisations is no model at all. DTensor shards (FSDP2 on GPUs) are
    drawn by DTensor's rank-aware RNG, which already agrees; they are left alone."""
    import torch.distributed as dist

    from diffv2_lit.gradients import is_dtensor

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if not is_dtensor(tensor):
                dist.broadcast(tensor.data, src=0)


class DecoderLM(L.LightningModule):
    def __init__(
        self,
        architecture: Architecture | str = "quickstart",  # also a ModelConfig or a dict, from Python
        lr: float = 3e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
        schedule: ScheduleName = "cosine",
        warmup_steps: int = 100,
        min_lr_ratio: float = 0.1,
        decay_fraction: float = 0.2,
        max_steps: int | None = None,
        parallel: ParallelSettings = ParallelSettings(),  # also a dict, from Python
        fused_adamw: bool | None = None,
        loss_impl: Literal["auto", "plain", "chunked", "liger"] = "auto",
        z_loss: float = 0.0,
        kernels: Literal["torch", "liger"] = "torch",
        init_from: str | None = None,
        float8: bool | Literal["tensorwise", "rowwise"] = False,
        async_checkpoints: bool = True,
        optimizer: OptimizerName = "adamw",
        muon_lr: float = 0.02,
        muon_weight_decay: float = 0.0,
        muon_momentum: float = 0.95,
        muon_nesterov: bool = True,
        muon_ns_steps: int = 5,
        muon_adjust_lr: MuonScale = "original",
    ) -> None:
        """
        Args:
            architecture: a preset name (`125m`) or `{preset: ..., <ModelConfig field>: ...}` (recipes:
                `model.architecture`; `self.model` is the Transformer it builds).
            lr, betas, eps, weight_decay: AdamW; decay applies to weight matrices only (see optim.py).
            schedule: `cosine` (warmup then cosine to `min_lr_ratio`), `wsd` (warmup, stable, linear
                decay over the last `decay_fraction` of the steps) or `constant` (after warmup).
            max_steps: length of the schedule; None uses `trainer.max_steps` (never
                `estimated_stepping_batches`, which breaks dataloader resume, Lightning #20550).
            parallel: how the model is parallelised (recipes: `model.parallel.<key>`; `ParallelSettings` in
                training/parallel.py): activation_checkpointing, compile, and the FSDP2 settings
                fsdp_param_dtype, fsdp_reduce_dtype, cpu_offload, fsdp_sync_every_micro_batch, fsdp_shard_size.
            fused_adamw: the fused AdamW kernel; None (default) uses it on CUDA. Gradient clipping and
                the spike detector work with it under every precision (see configure_gradient_clipping).
            loss_impl: how the output layer and the cross-entropy run (diffv2_lit/model/loss.py): `plain`
                (full logits), `chunked` (never more than a chunk of logits, plain PyTorch), `liger`
                (liger-kernel's fused kernel, CUDA), `auto` (liger on CUDA when installed, else plain).
            z_loss: PaLM's z-loss coefficient: training adds z_loss * logsumexp(logits)^2 per token (every
                loss_impl; in train/loss, not in val/loss). 0 (default) is off.
            kernels: RMSNorm and SwiGLU as PyTorch ops (`torch`, fused by `compile` when it is on) or as
                liger-kernel's Triton kernels (`liger`, CUDA); see diffv2_lit/model/fused.py.
            init_from: start from the weights of a checkpoint (.ckpt file or sharded folder) or of a
                `diffv2-lit export` folder, with a fresh optimizer and schedule (to continue the same
                run, use `--ckpt_path` instead). Its model config must match this one.
            float8: torchao float8 training of the blocks' attention and SwiGLU projections (`true` or
                `tensorwise`, `rowwise`); checkpoints stay those of the unconverted model
                (diffv2_lit/training/float8.py). GPUs of compute capability 8.9+ (H100, H200).
            async_checkpoints: FSDP2 sharded checkpoints are written in the background (training waits only
                for the copy to host memory); a checkpoint counts once its write finished on every rank
                (diffv2_lit/checkpoint/atomic_io.py). False: every save blocks until written.
            optimizer: `adamw` (default) for every parameter, or `muon`: Muon for the blocks' 2-D matrices
                (q/k/v/o, SwiGLU gate/up/down) and AdamW (`lr`, `betas`, ...) for the rest: embeddings,
                output layer, norms, lambdas (optim.py, muon.py). The LR schedule scales both.
            muon_lr, muon_weight_decay, muon_momentum, muon_nesterov, muon_ns_steps, muon_adjust_lr: Muon's
                settings (peak LR, decoupled decay, momentum, Nesterov, Newton-Schulz steps, per-matrix LR
                scale). Defaults are Keller Jordan's Muon (0.02, 0, 0.95, true, 5, `original`:
                sqrt(max(1, fan_out/fan_in))); `match_rms_adamw` (Moonshot) is meant for AdamW's LR and decay.
        """
        super().__init__()
        self.parallel = ParallelSettings.of(parallel)
        if not z_loss >= 0:
            raise ValueError(f"model.z_loss={z_loss!r} must be >= 0 (0 is off; PaLM uses 1e-4).")
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"model.loss_impl={loss_impl!r} is not one of: {', '.join(LOSS_IMPLS)}")
        if kernels not in KERNELS:
            raise ValueError(f"model.kernels={kernels!r} is not one of: {', '.join(KERNELS)}")
        check_optimization(lr, betas, eps, weight_decay, schedule, warmup_steps, min_lr_ratio, decay_fraction, max_steps)
        check_muon(optimizer, muon_lr, muon_weight_decay, muon_momentum, muon_ns_steps, muon_adjust_lr,
                   self.parallel.cpu_offload)
        self.model_config = resolve_model_config(architecture)
        self.save_hyperparameters(ignore=["architecture", "parallel"])
        # Plain dicts in the checkpoint (no pickled classes): the spec as given and the full config, which
        # other tools (generate, export, compare) read to rebuild the model. Saved again so that the logger's
        # hparams.yaml holds them too (it writes the first snapshot).
        plain = {"architecture": dataclasses.asdict(architecture) if dataclasses.is_dataclass(architecture)
                 else architecture, "model_config": dataclasses.asdict(self.model_config),
                 "parallel": dataclasses.asdict(self.parallel)}
        if init_from is not None:  # a str, not a pathlib object: checkpoints hold data only (safe_load.py)
            plain["init_from"] = os.fspath(init_from)
        self.save_hyperparameters({**self.hparams, **plain})
        self.model: Transformer | None = None
        self.loss_impl: str | None = None  # model.loss_impl resolved for the device, in configure_model
        self.step_statistics = StepStatistics()
        self._step_result: StepResult | None = None
        self._warned_short_schedule = False

    # ---- model construction ------------------------------------------------------------------

    def setup(self, stage: str) -> None:
        # A sharded (FSDP2) save counts as complete only once every rank wrote its part (checkpoint/layout.py).
        self._sharded_saves = MarkShardedSaves.install(self.trainer.strategy, self.hparams.get("async_checkpoints", True))

    def configure_model(self) -> None:
        if self.model is not None:  # called again by validate/test after fit
            return
        self._handshake_with_the_data()
        problem = kernels_problem(self.hparams.kernels, self._init_device().type) or \
            float8_problem(self.hparams.float8, self._init_device())
        if problem:
            raise UsageError(problem)
        self.loss_impl = self._resolve_loss_impl()
        with torch.device("meta"):
            model = Transformer(self.model_config)
        use_kernels(model, self.hparams.kernels)  # before sharding and compiling: it swaps forwards
        mesh = self._device_mesh
        if mesh is not None and mesh.device_type == "cpu":
            # DTensor random ops are not sharding-aware on CPU (each rank would draw its shard from the
            # same seed): initialise the full model first, then shard. Only small CPU models get here.
            self._materialize(model)
            self._parallelize(model)
        else:
            # GPU / no sharding: shard while on meta, so no rank ever holds the full model, then
            # materialise the shards and run the one init (DTensor RNG keeps it sharding-independent).
            self._parallelize(model)
            self._materialize(model)
        self.model = model

    def _resolve_loss_impl(self) -> str:
        """`model.loss_impl` as it will run on this device (`auto` -> liger or plain), chosen once here: every
        training and validation step then runs that implementation without asking again."""
        try:
            return resolve_loss_impl(self.hparams.loss_impl, self._init_device())
        except ValueError as err:
            raise UsageError(f"model.{err}") from None

    def _parallelize(self, model: Transformer) -> None:
        settings = self.parallel
        parallelize(
            model, device_mesh=self._device_mesh, activation_checkpointing=settings.activation_checkpointing,
            compile=settings.compile, param_dtype=settings.fsdp_param_dtype, reduce_dtype=settings.fsdp_reduce_dtype,
            cpu_offload=settings.cpu_offload, float8=self.hparams.float8, shard_size=self._fsdp_shard_size(),
        )
        self._float8_scales = all_gathers_in_float8(model)

    def _fsdp_shard_size(self) -> int | None:
        size = self.parallel.fsdp_shard_size
        return self.trainer.num_devices if size == "node" else size

    def _materialize(self, model: Transformer) -> None:
        model.to_empty(device=self._init_device())
        model.init_weights()  # the one initialisation
        _share_from_rank_zero(model)
        if self.hparams.init_from:
            self._load_initial_weights(model, self.hparams.init_from)
        if self.parallel.cpu_offload and self._device_mesh is not None:
            model.to("cpu")  # FSDP2's CPUOffloadPolicy wants the sharded parameters on the host

    def _load_initial_weights(self, model: Transformer, path: str) -> None:
        """Full (unsharded) weights into a plain or FSDP2-sharded model. Rank 0 alone reads the file and
        broadcasts it (each rank keeps its shard): a 6.7b checkpoint is 26.5 GB, read once per node's GPU
        otherwise. A refusal on rank 0 reaches every rank, so all stop with the same message."""
        import torch.distributed as dist
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from diffv2_lit.checkpoint import CheckpointError, ResumeError
        from diffv2_lit.checkpoint.compat import SHAPE_FIELDS, model_mismatch
        from diffv2_lit.checkpoint.reading import load_state_dict_for_training

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        state_dict, refusal = {}, None
        if not distributed or dist.get_rank() == 0:
            try:
                saved_config, state_dict = load_state_dict_for_training(path)
                problem = model_mismatch(saved_config, self.model_config, SHAPE_FIELDS)  # new context or RoPE base: allowed
                refusal = ("ResumeError", f"cannot initialise from {path}: {problem}") if problem else None
            except CheckpointError as err:
                refusal = ("CheckpointError", str(err))
        if distributed:
            shared = [refusal]
            dist.broadcast_object_list(shared, src=0)
            refusal = shared[0]
        if refusal:
            kind, message = refusal
            raise (ResumeError if kind == "ResumeError" else CheckpointError)(message)
        set_model_state_dict(model, state_dict, options=StateDictOptions(full_state_dict=True,
                                                                         broadcast_from_rank0=distributed))
        from lightning.pytorch.utilities import rank_zero_info

        rank_zero_info(f"initialised the model's weights from {path} (fresh optimizer and LR schedule)")

    def _init_device(self) -> torch.device:
        """Where the shards are materialised and initialised: the compute device, even with CPU offload.

        DTensor's random ops draw each shard from its own offset of one stream only on accelerators;
        on the CPU every rank would draw its shard from the same seed, so all shards of a weight would
        hold the same values. With `cpu_offload` the shards are therefore initialised on the GPU and
        moved to the host afterwards (`_materialize`); CPU meshes initialise before sharding instead.
        """
        if self._trainer is None:
            return torch.device("cpu")
        return self.trainer.strategy.root_device

    def _handshake_with_the_data(self) -> None:
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        tokenizer = check_data_fits_model(self.model_config, datamodule)
        if tokenizer is not None:
            self.hparams["tokenizer"] = tokenizer
        identity = getattr(datamodule, "tokenizer_identity", None)
        if isinstance(identity, dict) and identity.get("hash"):  # `generate` compares it with the tokenizer it gets
            self.hparams["tokenizer_sha256"] = identity["hash"]

    def forward(self, input_ids: Tensor | Callable[[Transformer], Any], *args: Any, **kwargs: Any) -> Any:
        """`self.model(input_ids, ...)`, the Transformer's forward; or, given a function `run`, `run(self.model)`.
        The training and validation steps call `self.model` itself; callbacks that run the model outside them go
        through `callbacks.protocol.with_model`, which under FSDP1 (`strategy: fsdp`, where Lightning wraps this
        module and only the wrapper's forward gathers the root's parameters) calls the wrapper with `run`, so
        that `run` executes here, inside the wrapper's forward."""
        if callable(input_ids):
            return input_ids(self.model)
        return self.model(input_ids, *args, **kwargs)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model shape or attention variant before its weights are loaded
        (instead of a size-mismatch traceback, or silently loading DIFF V2 weights into a baseline), and
        warn when the data's tokenizer changed since it was written."""
        from lightning.pytorch.utilities import rank_zero_warn

        from diffv2_lit.checkpoint.compat import check_resume

        saved = checkpoint.get("hyper_parameters", {}) or {}
        check_resume(saved, self.model_config, "the checkpoint")
        check_same_optimizer(saved, self.hparams, "the checkpoint")
        # on_train_start applies this run's optimizer settings over the restored state (Lightning restores
        # the optimizer and scheduler after this hook).
        recorded = checkpoint.get(RESUME_KEY) or {}
        self._resumed = {"hparams": saved, "schedule_steps": recorded.get("schedule_steps"),
                         "layout": recorded.get("layout")}
        before, now = saved.get("tokenizer"), self.hparams.get("tokenizer")
        if before and now and before != now:
            rank_zero_warn(f"resuming with tokenizer {now!r}, but the checkpoint was trained with {before!r}: "
                           "token ids now mean different text; set data.tokenizer back unless this is intended.")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # A resume says when these change.
        checkpoint[RESUME_KEY] = {"schedule_steps": self.schedule_steps(), "layout": self._batch_layout()}

    def _batch_layout(self) -> dict:
        """How an optimizer step's sequences are laid out: processes x accumulated micro-batches x micro-batch."""
        return {"processes": self.trainer.world_size, "accumulation": self.trainer.accumulate_grad_batches,
                "micro_batch": getattr(self.trainer.datamodule, "batch_size", None)}

    def on_train_start(self) -> None:
        """A resume continues with this run's optimizer settings (the saved config.yaml is what runs): each
        change from the checkpoint's is applied to the restored optimizer and scheduler and named in one line."""
        resumed, self._resumed = getattr(self, "_resumed", None), None
        if resumed is None:
            return
        scheduler = self.lr_schedulers()
        changes = apply_optimizer_settings(
            self.optimizers(use_pl_optimizer=False), scheduler, resumed["hparams"], dict(self.hparams),
            resumed["schedule_steps"], self.schedule_steps())
        layout_change = _batch_layout_change(resumed["layout"], self._batch_layout())
        for change in [*changes, *filter(None, [layout_change])] if self.trainer.is_global_zero else ():
            print(f"resuming at step {self.trainer.global_step} with {change}")

    # ---- training ----------------------------------------------------------------------------

    def summed_loss(self, input_ids: Tensor, targets: Tensor, *document_ids: Tensor, z_loss: float = 0.0) -> Tensor:
        """Summed token cross-entropy in fp32 (bf16 logits lose the small probabilities); -100 is ignored.
        The model fuses its output layer with the loss (`loss_impl`); `z_loss` adds the z term (training). A
        third batch tensor (data.document_mask) is the per-token document ids; without it the call is the plain
        causal one."""
        return self.model(input_ids, targets=targets, loss_impl=self.loss_impl, z_loss=z_loss,
                          document_ids=document_ids[0] if document_ids else None)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """FSDP2 gradient accumulation: reduce-scatter only after the last micro-batch of a step.

        Lightning's `block_backward_sync` (its no-sync for accumulating micro-batches) knows only DDP;
        FSDP2's switch is `set_requires_gradient_sync`.
        """
        from torch.distributed.fsdp import FSDPModule

        if isinstance(self.model, FSDPModule) and not self.parallel.fsdp_sync_every_micro_batch:
            self.model.set_requires_gradient_sync(self._steps_after(batch_idx))

    def _steps_after(self, batch_idx: int) -> bool:
        """Whether an optimizer step follows this micro-batch: the accumulation is complete, or the epoch ends
        (Lightning then steps on what it has), as the fit loop decides it."""
        trainer = self.trainer
        epoch_ends = (batch_idx + 1 == trainer.num_training_batches
                      or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)  # set before this hook runs
        return (batch_idx + 1) % trainer.accumulate_grad_batches == 0 or epoch_ends

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        input_ids, targets, *document_ids = batch
        counted = (targets != IGNORE_INDEX).sum()
        # The summed loss over a constant: the gradients are made per-token once the step's global count of
        # counted tokens is known (step_stats.py), so micro-batches and ranks weigh by their tokens.
        summed = self.summed_loss(input_ids, targets, *document_ids, z_loss=self.hparams.get("z_loss", 0.0))
        return self.step_statistics.loss_for_backward(summed, counted, targets.numel())

    def step_result(self) -> StepResult:
        """This optimizer step's global numbers (tokens, mean loss, gradient norm before clipping, flags),
        computed once per step with one collective and one host sync, after which the gradients are per-token.

        Callbacks run their `on_before_optimizer_step` before this module's, so the spike detector asks first
        and may then drop the gradients (skip mode); the logged norm is still the real one.
        """
        if self._step_result is None or self._step_result.step != self.global_step:
            optimizer = self.trainer.optimizers[0] if self.trainer.optimizers else None
            unscale_fused_(getattr(self.trainer.precision_plugin, "scaler", None), optimizer)
            self._step_result = self.step_statistics.finish(
                self.global_step, list(self.parameters()), self.trainer.strategy.root_device,
                accumulation=self.trainer.accumulate_grad_batches, world_size=self.trainer.world_size,
                plain_grads_sharded=self._grads_sharded())
        return self._step_result

    @property
    def last_step_result(self) -> StepResult | None:
        """The newest `step_result()` computed, without computing one (for hooks after the optimizer step)."""
        return self._step_result

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Lightning clips gradients right after this hook, so this is the norm before clipping.
        result = self.step_result()
        metrics = {"train/loss": result.loss, "train/grad_norm": result.grad_norm, "lr": optimizer.param_groups[0]["lr"]}
        # Host numbers: `self.log` would copy each to the device and read it back when it writes. Callbacks
        # (a ModelCheckpoint monitoring train/loss) see them in callback_metrics as plain floats.
        self.trainer.callback_metrics.update(metrics)
        if self._is_logging_step():
            for logger in self.loggers:
                logger.log_metrics(metrics, step=result.step)
        self._refuse_non_finite_update(optimizer, result)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if getattr(self, "_float8_scales", False):
            precompute_scales(self.model)  # FSDP2 float8 all-gather: all weights' scales in one all-reduce

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if getattr(self, "_sharded_saves", None) is not None:
            self._sharded_saves.poll()  # mark the background saves that have finished

    def on_fit_end(self) -> None:
        if getattr(self, "_sharded_saves", None) is not None:
            self._sharded_saves.wait()  # the run's last checkpoints are written and marked before it ends

    def teardown(self, stage: str) -> None:
        saves = getattr(self, "_sharded_saves", None)
        if saves is not None and saves.in_flight:  # a run that stopped on an error: finish what can be finished
            try:
                saves.wait()
            except CheckpointError as err:
                rank_zero_warn(str(err))

    def _is_logging_step(self) -> bool:
        """Lightning's rule for `log_every_n_steps`, at the step about to be taken."""
        every = self.trainer.log_every_n_steps
        return bool(every) and (self.global_step + 1) % every == 0

    def _refuse_non_finite_update(self, optimizer: torch.optim.Optimizer, result: StepResult) -> None:
        """A non-finite gradient about to be applied ends the run here, before the weights (and anything
        saved after them) turn NaN, whatever the spike detector's action: `skip` and `stop` have already
        dropped the gradients by now (callbacks run first), so only an update that would really happen is
        refused. The global norm is the same on every rank, so every rank stops together. fp16's expected
        overflows are left to GradScaler, which skips those steps itself."""
        if getattr(self.trainer.precision_plugin, "scaler", None) is not None or math.isfinite(result.grad_norm):
            return
        if any(p.grad is not None for g in optimizer.param_groups for p in g["params"]):
            raise DivergedError(self.global_step, result.grad_norm, _last_good_checkpoint(self.trainer))

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip with this step's global norm instead of the precision plugin's clipping, which cannot clip
        a fused optimizer under mixed precision, nor FSDP1's shards by norm (see gradients.py)."""
        if not gradient_clip_val:
            return
        if gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(self.parameters(), gradient_clip_val)  # elementwise: shards need nothing global
        else:
            clip_by_total_norm_(self.parameters(), gradient_clip_val, self.step_result().grad_norm)

    def _grads_sharded(self) -> bool:
        from lightning.pytorch.strategies import FSDPStrategy

        return isinstance(self.trainer.strategy, FSDPStrategy)  # FSDP1 flat shards; FSDP2 grads are DTensors

    # ---- validation: token-weighted mean loss -------------------------------------------------

    def on_validation_epoch_start(self) -> None:
        self._val_loss_sum = torch.zeros((), device=self.device, dtype=torch.float64)
        self._val_tokens = torch.zeros((), device=self.device, dtype=torch.float64)

    def validation_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        input_ids, targets, *document_ids = batch
        self._val_loss_sum += self.summed_loss(input_ids, targets, *document_ids).double()
        self._val_tokens += (targets != IGNORE_INDEX).sum()

    def on_validation_epoch_end(self) -> None:
        loss_sum = self.trainer.strategy.reduce(self._val_loss_sum, reduce_op="sum")
        tokens = self.trainer.strategy.reduce(self._val_tokens, reduce_op="sum")
        mean = (loss_sum / tokens.clamp(min=1)).float()
        self.log_dict({"val/loss": mean, "val/ppl": mean.exp()}, prog_bar=True)

    # ---- optimizer and schedule --------------------------------------------------------------

    def configure_optimizers(self) -> dict[str, Any]:
        muon = self.hparams.get("optimizer", "adamw") == "muon"
        groups = parameter_groups(self.model, self.hparams.weight_decay, muon_settings(self.hparams) if muon else None)
        for group in groups:
            group.pop("names")  # kept out of the optimizer state (distributed checkpoints flatten it)
        fused = self.hparams.fused_adamw
        if fused is None:
            fused = all(p.is_cuda for g in groups for p in g["params"]) or None
        adamw = {"lr": self.hparams.lr, "betas": tuple(self.hparams.betas), "eps": self.hparams.eps, "fused": fused}
        if muon:
            # bf16 Newton-Schulz as torch.optim.Muon where bf16 matmuls are fast (CUDA); on a CPU without bf16
            # units they are emulated, 20x slower than fp32 (a quickstart step took 4.5x AdamW's time).
            on_cuda = all(p.is_cuda for g in groups for p in g["params"])
            optimizer = MuonAdamW(groups, **adamw, ns_dtype=torch.bfloat16 if on_cuda else torch.float32)
        else:
            optimizer = torch.optim.AdamW(groups, **adamw)
        multiplier = functools.partial(
            lr_multiplier, schedule=self.hparams.schedule, max_steps=self.schedule_steps(),
            warmup_steps=self.hparams.warmup_steps, min_lr_ratio=self.hparams.min_lr_ratio,
            decay_fraction=self.hparams.decay_fraction,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def schedule_steps(self) -> int:
        steps = self.hparams.max_steps or (self.trainer.max_steps if self._trainer else -1)
        if steps is None or steps <= 0:
            raise UsageError(
                "the LR schedule needs a length: set trainer.max_steps (or model.max_steps). It is not derived "
                "from estimated_stepping_batches, which would skip restoring the dataloader state on resume."
            )
        if self.hparams.warmup_steps >= steps and not self._warned_short_schedule:
            # A warning, not an error: `--trainer.max_steps 100` is how one tries a recipe quickly.
            from lightning.pytorch.utilities import rank_zero_warn

            rank_zero_warn(f"model.warmup_steps={self.hparams.warmup_steps} is not below the schedule's {steps} "
                           "steps (trainer.max_steps): the LR never leaves its warm-up in this run.")
            self._warned_short_schedule = True
        return steps


def _batch_layout_change(before: dict | None, now: dict) -> str | None:
    """One line when the run resumes on another number of processes (docs/faults.md, "Resuming on another
    number of processes"), or None. Checkpoints written before the layout was recorded say nothing."""
    if not before or before.get("processes") == now["processes"]:
        return None

    def plural(n: int) -> str:
        return f"{n} process" + ("es" if n != 1 else "")

    def sequences(layout: dict) -> int | None:
        if layout.get("micro_batch") is None:
            return None
        return layout["processes"] * layout["accumulation"] * layout["micro_batch"]

    line = f"{plural(now['processes'])} (the checkpoint was written by {plural(before['processes'])}): "
    old, new = sequences(before), sequences(now)
    if old is not None and old == new:
        if before["accumulation"] == now["accumulation"]:  # processes x micro-batch unchanged (tested exact)
            return line + (f"the same {new} sequences per optimizer step; the run continues as it would have (LitData "
                           "shares the remaining data out over the new processes)")
        return line + (f"the same {new} sequences per optimizer step, but accumulated {now['accumulation']} times "
                       f"instead of {before['accumulation']}: the remaining data is grouped into steps in another "
                       f"order (keep accumulation {before['accumulation']} and set data.batch_size to continue exactly)")
    if old is not None and new is not None:
        return line + (f"{new} sequences per optimizer step instead of {old}: set data.batch_size or "
                       "trainer.accumulate_grad_batches (or --global_batch_size) to keep the run's global batch")
    return line + "the data continues where it stopped, shared out over the new processes"
