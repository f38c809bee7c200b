"""A callback for tests/training/test_parallel_settings.py: at train start, writes which blocks the model
wraps for activation checkpointing and the module's parallel settings to `out` (JSON)."""

import dataclasses
import json

import lightning as L


class RecordParallelism(L.Callback):
    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        with open(self.out, "w") as f:
            json.dump({"blocks": [type(block).__name__ for block in pl_module.model.layers],
                       "settings": dataclasses.asdict(pl_module.parallel)}, f)
