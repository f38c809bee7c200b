"""The callbacks' model calls under a real FSDP1 wrapper, in each of 2 processes (gloo, CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/callbacks/fsdp1_run.py OUT_DIR

A `DecoderLM` is wrapped as Lightning's FSDPStrategy wraps it (the whole module, one unit per Block; Lightning
refuses FSDPStrategy on the CPU, so torch's FSDP is called directly). The reference is the same weights
unwrapped on every rank. `SampleText.sample` and `DiffMonitor.measure` run through `protocol.with_model`, as the
callbacks do in training; a direct call of the sharded model is tried too, to show the wrapper is needed.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from diffv2_lit.callbacks import DiffMonitor, SampleText  # noqa: E402
from diffv2_lit.callbacks.protocol import with_model  # noqa: E402
from diffv2_lit.model.transformer import Block  # noqa: E402
from diffv2_lit.training.module import DecoderLM  # noqa: E402

ARCHITECTURE = {"preset": "quickstart", "vocab_size": 256, "n_layers": 2, "dim": 32, "n_heads": 2, "n_kv_heads": 1,
                "head_dim": 16, "max_seq_len": 64, "attention": "diffv2"}


def main(out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    module = DecoderLM(architecture=ARCHITECTURE)
    module.configure_model()
    reference = copy.deepcopy(module)
    wrapper = FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                                       device_id=torch.device("cpu"))
    trainer = SimpleNamespace(model=wrapper)  # what with_model reads of the Trainer
    sampler = SampleText(prompt="ab", max_new_tokens=12, temperature=0.0)
    monitor = DiffMonitor()
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))

    try:
        module.model(tokens)
        direct = "ran"
    except Exception as err:  # the root's parameters are this rank's flat shard outside the wrapper's forward
        direct = type(err).__name__
    result = {
        "rank": rank,
        "direct_call": direct,
        "local_elements": sum(p.numel() for p in module.model.parameters()),
        "full_elements": sum(p.numel() for p in reference.model.parameters()),
        "sample": sampler.sample(module, trainer),
        "reference_sample": sampler.sample(reference, None),
        "scalars": with_model(trainer, module, lambda model: monitor.measure(model, tokens))[0],
        "reference_scalars": monitor.measure(reference.model, tokens)[0],
    }
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
