"""A tiny FSDP2 run with `model.float8` in its own processes (Lightning re-launches this script per rank).

    python tests/training/float8_run.py --devices 2 --float8 tensorwise --out result.json

The JSON holds the per-step losses and whether the weights were all-gathered in float8.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning as L  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from diffv2_lit.training.float8 import all_gathers_in_float8  # noqa: E402
from tests.training.helpers import LossRecorder, tiny_data, tiny_module, tiny_trainer  # noqa: E402

GLOBAL_BATCH = 4


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--float8", default="false")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    float8 = {"false": False, "true": True}.get(args.float8, args.float8)

    L.seed_everything(0)
    recorder = LossRecorder()
    trainer = tiny_trainer(max_steps=args.steps, callbacks=[recorder], devices=args.devices,
                           strategy=ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1))
    module = tiny_module(max_steps=args.steps, warmup_steps=1, parallel={"fsdp_param_dtype": None, "fsdp_reduce_dtype": None},
                         float8=float8)
    trainer.fit(module, tiny_data(batch_size=GLOBAL_BATCH // args.devices, seq_len=args.seq_len))
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"losses": recorder.losses, "float8_all_gather": all_gathers_in_float8(module.model)}, f)


if __name__ == "__main__":
    main()
