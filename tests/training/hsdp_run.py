"""A tiny FSDP2 run on N CPU processes (Lightning re-launches this script per rank), plain or hybrid-sharded.

    python tests/training/hsdp_run.py --devices 4 --shard-size 2 --max-steps 4 --ckpt-dir ckpts --out r.json
    python tests/training/hsdp_run.py --devices 4 --max-steps 6 --ckpt-dir ckpts --resume-from ckpts/step=4.ckpt ...

The JSON holds the per-step losses and gradient norms (before clipping) and the mesh the blocks were sharded on.
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

from tests.training.helpers import LossRecorder, tiny_data, tiny_module, tiny_trainer  # noqa: E402

GLOBAL_BATCH = 4
SCHEDULE_STEPS = 6


class GradNorms(L.Callback):
    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.norms.append(pl_module.step_result().grad_norm)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, required=True)
    parser.add_argument("--shard-size", type=int, default=None)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--ckpt-dir", required=True)
    parser.add_argument("--resume-from")
    parser.add_argument("--global-batch", type=int, default=GLOBAL_BATCH)
    parser.add_argument("--accumulate", type=int, default=1)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    L.seed_everything(0)
    recorder, norms = LossRecorder(), GradNorms()
    saves = ModelCheckpoint(dirpath=args.ckpt_dir, filename="{step}", every_n_train_steps=2, save_top_k=-1)
    trainer = tiny_trainer(max_steps=args.max_steps, callbacks=[recorder, norms, saves], devices=args.devices,
                           enable_checkpointing=True,
                           strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1),
                           accumulate_grad_batches=args.accumulate)
    module = tiny_module(max_steps=SCHEDULE_STEPS, parallel={"fsdp_param_dtype": None, "fsdp_reduce_dtype": None,
                                                                    "fsdp_shard_size": args.shard_size})
    micro_batch = args.global_batch // args.devices // args.accumulate
    trainer.fit(module, tiny_data(batch_size=micro_batch), ckpt_path=args.resume_from)
    mesh = module.model.layers[0].self_attn.q_proj.weight.device_mesh
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"losses": recorder.losses, "grad_norms": norms.norms, "mesh": list(mesh.shape),
                       "mesh_dims": list(mesh.mesh_dim_names or ())}, f)


if __name__ == "__main__":
    main()
