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
rank's flat shard. So `model_call` goes through the wrapper, which runs `DecoderLM.forward(input_ids, cache)`.
"""

from __future__ import annotations

from collections.abc import Callable

import lightning as L
from torch import Tensor


def model_call(trainer: L.Trainer | None, pl_module: L.LightningModule) -> Callable[..., Tensor]:
    """`call(input_ids, cache=None) -> logits` for `pl_module.model`, valid on every rank (a collective
    under sharding: every rank must make the same calls)."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    wrapper = trainer.model if trainer is not None else None
    if isinstance(wrapper, FullyShardedDataParallel):
        return wrapper
    return pl_module.model


def decode_mode(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """How a callback should decode: a captured step ("cuda-graphs") on one unsharded CUDA model; eagerly
    where the parameters are sharded (each step's all-gathers cannot be captured) or on the CPU."""
    from torch.distributed.tensor import DTensor

    wrapped = model_call(trainer, pl_module) is not pl_module.model  # FSDP1
    sharded = wrapped or any(isinstance(p, DTensor) for p in pl_module.model.parameters())  # FSDP2
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
