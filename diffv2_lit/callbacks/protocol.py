"""What the callbacks ask of the LightningModule, and how they run the model outside the training step.

The callbacks know `DecoderLM` only through this protocol (any LightningModule that offers it works):

    pl_module.model            a `diffv2_lit.model.Transformer` (DiffMonitor's probe, SampleText's `generate`)
    pl_module.model_config     its `ModelConfig` (ThroughputMFU's FLOPs, SampleText's context length)
    pl_module.step_result()    optional: this optimizer step's global numbers (`StepResult`: tokens, mean loss,
                               gradient norm before clipping, flags), computed once per step with one collective
                               and one host sync (the spike detector shares them; without it the detector
                               computes the norm itself)
    pl_module.last_step_result optional: the newest of those, read after the optimizer step (preemption)
    pl_module.step_statistics  optional: where a callback adds a flag any rank may raise (`add_flag`), reduced
                               with the step's numbers
    pl_module.hparams["tokenizer"]  optional: the data's tokenizer spec (SampleText's encoding)

Under FSDP2 (`ModelParallelStrategy`) the Transformer itself is the root of the sharding, so calling
`pl_module.model` gathers its parameters as training does. Under FSDP1 (`FSDPStrategy`) Lightning wraps
the whole LightningModule, and only that wrapper's forward gathers the root parameters (embeddings,
final norm) and casts them to the compute dtype: a direct call of `pl_module.model` would read the
rank's flat shard. So `with_model` runs the callback's work inside the wrapper's forward: under FSDP1 the
module's `forward(run)`, given a function, must return `run(pl_module.model)` (`DecoderLM.forward` does), and the model keeps
its one forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import lightning as L
from torch import nn

T = TypeVar("T")


def fsdp1_wrapper(trainer: L.Trainer | None) -> nn.Module | None:
    """The FSDP1 wrapper around the LightningModule (`strategy: fsdp`), or None under every other strategy."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = trainer.model if trainer is not None else None
    return wrapper if isinstance(wrapper, FullyShardedDataParallel) else None


def with_model(trainer: L.Trainer | None, pl_module: L.LightningModule, run: Callable[[nn.Module], T]) -> T:
    """`run(pl_module.model)` where calling the Transformer directly is valid, on every rank (a collective under
    sharding: every rank must make the same calls): under FSDP1 inside the wrapper's forward, which holds the
    root's parameters gathered while `run` calls the model (each block's unit gathers its own)."""
    wrapper = fsdp1_wrapper(trainer)
    if wrapper is not None:
        return wrapper(run)
    return run(pl_module.model)


def decode_mode(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """How a callback should decode: a captured step ("cuda-graphs") on one unsharded CUDA model; eagerly
    where the parameters are sharded (each step's all-gathers cannot be captured) or on the CPU."""
    from torch.distributed.tensor import DTensor

    sharded = fsdp1_wrapper(trainer) is not None or any(isinstance(p, DTensor) for p in pl_module.model.parameters())
    return "cuda-graphs" if pl_module.device.type == "cuda" and not sharded else "eager"


class OncePerStep:
    """Picks the first of an optimizer step's micro-batches: Lightning calls the batch hooks once per
    micro-batch, and under gradient accumulation all micro-batches of a step see one `trainer.global_step`.

        gate.first(trainer.global_step)   True once per step value (then False until the step moves on)
        gate.seen = trainer.global_step   at train start: a resumed step counts as handled
    """

    def __init__(self) -> None:
        self.seen: int | None = None

    def first(self, step: int) -> bool:
        if step == self.seen:
            return False
        self.seen = step
        return True


def log_metrics(trainer: L.Trainer, metrics: dict[str, float], step: int) -> None:
    """Host numbers straight to the loggers at `step`. `LightningModule.log` would turn each into a device
    tensor (a blocking host-to-device copy on a GPU) and read it back when it writes; loggers write on rank
    zero only."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=step)
