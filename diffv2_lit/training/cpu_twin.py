"""A hardware fragment (configs/hardware/) on one device: `benchmarks/gpu_suite.py` runs each fragment so on
CUDA, and tests/training/test_hardware_matrix.py on the CPU, the same settings in both.

On the CPU, Lightning's FSDPStrategy (FSDP1) needs a subclass to run.

Lightning refuses `FSDPStrategy` with `accelerator="cpu"` (an exact-type check in its accelerator
connector) and hands FSDP1 no device (`device_id=root_device.index`, None on the CPU), while torch's
FSDP1 itself runs on the CPU with gloo when given `device_id=torch.device("cpu")`. This subclass changes
only that, so the FSDP1 fragment's own settings (auto-wrap and activation-checkpointing policies,
sharded state dicts, FSDPPrecision) run here as they do on GPUs.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
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


def single_device_fragment(fragment: Path, accelerator: str, out: Path) -> Path:
    """A configs/hardware fragment on one device of one node (FSDP2's data-parallel size follows), written to
    `out`; on the CPU, FSDP1's strategy becomes CPUFSDPStrategy (same settings). Everything else stays as the
    fragment has it. The CPU matrix test and benchmarks/gpu_suite.py (on CUDA) run the same twins."""
    config = yaml.safe_load(Path(fragment).read_text())
    trainer = config["trainer"]
    trainer.update(accelerator=accelerator, devices=1, num_nodes=1)
    strategy = trainer.get("strategy")
    if isinstance(strategy, dict) and "data_parallel_size" in strategy.get("init_args", {}):
        strategy["init_args"]["data_parallel_size"] = 1
    if accelerator == "cpu" and isinstance(strategy, dict) and strategy["class_path"].endswith("FSDPStrategy"):
        strategy["class_path"] = f"{__name__}.CPUFSDPStrategy"  # Lightning refuses FSDPStrategy on the CPU
    out.write_text(yaml.safe_dump(config))
    return out
