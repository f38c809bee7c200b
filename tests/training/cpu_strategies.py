"""Lightning's FSDPStrategy (FSDP1) made to run on the CPU, for tests only.

Lightning refuses `FSDPStrategy` with `accelerator="cpu"` (an exact-type check in its accelerator
connector) and hands FSDP1 no device (`device_id=root_device.index`, None on the CPU), while torch's
FSDP1 itself runs on the CPU with gloo when given `device_id=torch.device("cpu")`. This subclass changes
only that, so the FSDP1 fragment's own settings (auto-wrap and activation-checkpointing policies,
sharded state dicts, FSDPPrecision) run here as they do on GPUs.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.strategies.fsdp import _setup_activation_checkpointing


class CPUFSDPStrategy(FSDPStrategy):
    def _setup_model(self, model: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        model = FullyShardedDataParallel(module=model, cpu_offload=self.cpu_offload,
                                         mixed_precision=self.mixed_precision_config,
                                         sharding_strategy=self.sharding_strategy, device_id=torch.device("cpu"),
                                         **self.kwargs)
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
