"""Run a tiny training job in its own process (Lightning re-launches this script once per rank).

    python tests/training/run_tiny.py --devices 2 --strategy fsdp2 --max-steps 4 --out losses.json \
        --ckpt-dir ckpts [--resume] [--accumulate 2] [--cpu-offload] [--sync-every-micro-batch]
        [--compile] [--activation-checkpointing N]

The JSON holds the per-step losses, the last gradient norm, and for every micro-batch whether the
parameters held gradients right after its backward (under FSDP2 a sharded `.grad` appears only when
the gradients are reduce-scattered).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning as L  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from diffv2_lit.training.parallel import ParallelSettings  # noqa: E402
from tests.training.helpers import LossRecorder, tiny_data, tiny_module, tiny_trainer  # noqa: E402

GLOBAL_BATCH = 4
SCHEDULE_STEPS = 6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", choices=["auto", "fsdp2"], default="auto")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", required=True)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--sync-every-micro-batch", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--activation-checkpointing", type=int, default=0)
    args = parser.parse_args()

    L.seed_everything(0)
    strategy = "auto"
    if args.strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    recorder, grads = LossRecorder(), GradientsAfterBackward()
    callbacks = [recorder, grads]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=2, save_last=True))
    trainer = tiny_trainer(max_steps=args.max_steps, callbacks=callbacks, devices=args.devices, strategy=strategy,
                           enable_checkpointing=bool(args.ckpt_dir), accumulate_grad_batches=args.accumulate)
    # fp32 everywhere on CPU: FSDP2 mixed precision off, so sharded and single runs compare closely.
    module = tiny_module(max_steps=SCHEDULE_STEPS, parallel=ParallelSettings(
                             fsdp_param_dtype=None, fsdp_reduce_dtype=None, cpu_offload=args.cpu_offload,
                             fsdp_sync_every_micro_batch=args.sync_every_micro_batch, compile=args.compile,
                             activation_checkpointing=args.activation_checkpointing))
    trainer.fit(module, tiny_data(batch_size=GLOBAL_BATCH // args.devices // args.accumulate),
                ckpt_path="last" if args.resume else None)
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"losses": recorder.losses, "grad_norm": module.last_step_result.grad_norm,
                       "grads_after_backward": grads.present}, f)


class GradientsAfterBackward(L.Callback):
    def __init__(self) -> None:
        self.present: list[bool] = []

    def on_after_backward(self, trainer, pl_module) -> None:
        self.present.append(any(p.grad is not None for p in pl_module.parameters()))


if __name__ == "__main__":
    main()
