"""Clip FSDP1 shards two ways and compare, in each of 2 processes (gloo, CPU):

    python -m torch.distributed.run --nproc_per_node 2 tests/training/fsdp1_clip_run.py OUT.json

FSDP1's own `FullyShardedDataParallel.clip_grad_norm_` is the reference; ours is what DecoderLM's
`configure_gradient_clipping` does under FSDPStrategy: the global norm of the flat shards
(`global_grad_norm(plain_grads_sharded=True)`) and `clip_by_total_norm_`. Lightning's FSDPStrategy
refuses the CPU, so the two identical models are wrapped here with torch's FSDP directly.
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from diffv2_lit.model import ModelConfig, Transformer  # noqa: E402
from diffv2_lit.model.transformer import Block  # noqa: E402
from diffv2_lit.gradients import clip_by_total_norm_, global_grad_norm  # noqa: E402

MAX_NORM = 0.05


def wrap(model: Transformer) -> FullyShardedDataParallel:
    return FullyShardedDataParallel(model, auto_wrap_policy=ModuleWrapPolicy({Block}), use_orig_params=True,
                                    device_id=torch.device("cpu"))


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=2, dim=32, n_heads=2, n_kv_heads=1, head_dim=16,
                                    max_seq_len=32, attention="diffv2"))
    model.init_weights()
    reference, ours = wrap(copy.deepcopy(model)), wrap(copy.deepcopy(model))
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))  # each rank its own data
    for wrapped in (reference, ours):
        wrapped(ids).float().logsumexp(-1).mean().backward()

    reference_norm = reference.clip_grad_norm_(MAX_NORM)
    our_norm = global_grad_norm(ours.parameters(), plain_grads_sharded=True)
    clip_by_total_norm_(ours.parameters(), MAX_NORM, our_norm)

    grads_equal = all(torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-8) for a, b in
                      zip(reference.parameters(), ours.parameters()) if a.grad is not None)
    shard_sizes = [p.grad.numel() for p in ours.parameters() if p.grad is not None]
    flags = torch.tensor([float(grads_equal)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"reference_norm": float(reference_norm), "our_norm": float(our_norm),
                       "clipped_grads_equal_on_every_rank": bool(flags.item()), "local_grad_elements": sum(shard_sizes),
                       "full_model_elements": sum(p.numel() for p in model.parameters())}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
