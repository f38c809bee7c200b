"""A 2-rank FSDP2 run with CPU offload and a gradient spike, recording what reaches collectives while the
norms are computed (Lightning re-launches this script once per rank).

    python tests/training/offload_norm_run.py --out record.json

With `cpu_offload` the gradient shards live on the host; on GPUs NCCL refuses host tensors, so the norms
must reduce one scalar (or one vector) made on the compute device, never a DTensor of offloaded shards
(`full_tensor()` / `redistribute()` would hand the collective the host shard's partial norm).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import lightning as L  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from diffv2_lit.callbacks import GradientSpikeDetector  # noqa: E402
from tests.training.helpers import ScaleGradientsAt, tiny_data, tiny_module, tiny_trainer  # noqa: E402

SPIKE_STEP = 6
FSDP_TRAFFIC = ("all_gather_into_tensor", "reduce_scatter_tensor")


class Recorder(L.Callback):
    def __init__(self) -> None:
        self.collectives: list[dict] = []
        self.dtensor_gathers = 0
        self.on = False
        self.devices: set[str] = set()
        self._patch()

    def _patch(self) -> None:
        recorder = self
        for name in ("all_reduce", "broadcast", "all_gather", "reduce", "all_gather_into_tensor", "reduce_scatter_tensor"):
            original = getattr(dist, name)

            def collective(tensor, *args, _original=original, _name=name, **kwargs):
                if recorder.on and _name not in FSDP_TRAFFIC:
                    recorder.collectives.append({"name": _name, "device": str(tensor.device), "numel": tensor.numel()})
                return _original(tensor, *args, **kwargs)
            setattr(dist, name, collective)
        for method in ("full_tensor", "redistribute"):
            original = getattr(DTensor, method)

            def counted(self_, *args, _original=original, **kwargs):
                if recorder.on:
                    recorder.dtensor_gathers += 1
                return _original(self_, *args, **kwargs)
            setattr(DTensor, method, counted)

    def on_train_start(self, trainer, pl_module) -> None:
        self.on = True
        self.devices = {str(p.grad.device if p.grad is not None else p.device) for p in pl_module.parameters()}
        self.root_device = str(trainer.strategy.root_device)

    def on_train_end(self, trainer, pl_module) -> None:
        self.on = False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    L.seed_everything(0)
    recorder = Recorder()
    detector = GradientSpikeDetector(warmup=3)
    trainer = tiny_trainer(max_steps=8, devices=2, callbacks=[detector, ScaleGradientsAt(SPIKE_STEP, 100.0), recorder],
                           strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
                           logger=L.pytorch.loggers.CSVLogger("logs"))
    trainer.fit(tiny_module(max_steps=8, parallel={"cpu_offload": True, "fsdp_param_dtype": None,
                                                          "fsdp_reduce_dtype": None}),
                tiny_data(batch_size=2))
    if trainer.is_global_zero:
        with open(args.out, "w") as f:
            json.dump({"collectives": recorder.collectives, "dtensor_gathers": recorder.dtensor_gathers,
                       "root_device": recorder.root_device, "spikes": detector.count,
                       "param_devices": sorted(recorder.devices)}, f)


if __name__ == "__main__":
    main()
