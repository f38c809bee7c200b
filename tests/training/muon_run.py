"""A tiny `model.optimizer: muon` run in its own process (Lightning re-launches this script once per rank).

    python tests/training/muon_run.py --devices 2 --strategy fsdp2 --max-steps 4 --out run.json \
        [--ckpt-dir ckpts --resume-to 6] [--ns-float32]

The JSON holds the per-step losses and, on rank 0, the full (gathered) weights of two matrices Muon steps
and one AdamW steps, as lists, so that runs can be compared parameter for parameter.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from tests.training.helpers import LossRecorder, tiny_data, tiny_module, tiny_trainer  # noqa: E402

GLOBAL_BATCH = 4
SCHEDULE_STEPS = 6
WATCHED = ("layers.0.self_attn.q_proj.weight", "layers.1.mlp.down_proj.weight", "lm_head.weight")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--strategy", choices=["auto", "fsdp2"], default="auto")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--ckpt-dir")
    parser.add_argument("--resume-to", type=int, help="then, in the same processes, resume from the last "
                        "checkpoint up to this step (one launch instead of two: processes start slowly)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--ns-float32", action="store_true", help="Newton-Schulz in float32 instead of bf16")
    args = parser.parse_args()

    module, losses = fit(args, args.max_steps, resume=False)
    if args.resume_to:
        module, more = fit(args, args.resume_to, resume=True)
        losses += more
    weights = {}
    for name, param in module.model.named_parameters():
        if name in WATCHED:  # full_tensor is a collective: every rank takes part
            full = param.full_tensor() if hasattr(param, "full_tensor") else param
            weights[name] = full.detach().tolist()
    if module.trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"losses": losses, "weights": weights}, f)


def fit(args, max_steps: int, resume: bool):
    L.seed_everything(0)
    strategy = "auto"
    if args.strategy == "fsdp2":
        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
    recorder = LossRecorder()
    callbacks = [recorder, *([NewtonSchulzInFloat32()] if args.ns_float32 else [])]
    if args.ckpt_dir:
        callbacks.append(ModelCheckpoint(dirpath=args.ckpt_dir, every_n_train_steps=2, save_last=True))
    trainer = tiny_trainer(max_steps=max_steps, callbacks=callbacks, devices=args.devices, strategy=strategy,
                           enable_checkpointing=bool(args.ckpt_dir))
    # fp32 everywhere on CPU (FSDP2 mixed precision off); a Muon decay and LR that move the weights visibly.
    module = tiny_module(max_steps=SCHEDULE_STEPS, parallel={"fsdp_param_dtype": None, "fsdp_reduce_dtype": None}, optimizer="muon",
                         muon_lr=0.05, muon_weight_decay=0.1)
    trainer.fit(module, tiny_data(batch_size=GLOBAL_BATCH // args.devices), ckpt_path="last" if resume else None)
    return module, recorder.losses


class NewtonSchulzInFloat32(L.Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        trainer.optimizers[0].ns_dtype = torch.float32


if __name__ == "__main__":
    main()
