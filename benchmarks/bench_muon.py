"""Cost of `model.optimizer: muon` on the CPU (not a test; run by hand, numbers go to docs/training.md).

Times one optimizer step (gradients already there) of AdamW and of MuonAdamW (Newton-Schulz in bf16 and
in fp32) on one Transformer, in one
process and in 2 gloo processes under FSDP2, where Muon all-gathers each matrix's nesterov update
(`full_tensor`) before Newton-Schulz. The 2-process run also times the gathers alone, to split the step
into communication and compute. Steps alternate (AdamW, Muon, AdamW, ...); medians are reported.

    python benchmarks/bench_muon.py [--dim 256] [--layers 4] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from diffv2_lit.model import Transformer, resolve_model_config
from diffv2_lit.training.muon import MuonAdamW
from diffv2_lit.training.optim import muon_parameter_names, parameter_groups


def build(args, world_size: int):
    torch.manual_seed(0)
    config = resolve_model_config({"preset": "quickstart", "dim": args.dim, "n_layers": args.layers,
                                   "n_heads": args.dim // 64, "n_kv_heads": args.dim // 128, "head_dim": 64,
                                   "ffn_hidden_dim": 4 * args.dim, "attention": "diffv2"})
    model = Transformer(config)
    model.init_weights()
    if world_size > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def optimizers(model):
    """AdamW, and Muon with Newton-Schulz in bf16 (torch.optim.Muon's, the module's choice on CUDA) and in
    fp32 (the module's choice on the CPU)."""
    def groups(muon: dict | None):
        found = parameter_groups(model, 0.1, muon)
        for group in found:
            group.pop("names")
        return found

    muon = {"lr": 0.02, "weight_decay": 0.0}
    return {"adamw": torch.optim.AdamW(groups(None), lr=1e-3, betas=(0.9, 0.95)),
            "muon": MuonAdamW(groups(muon), lr=1e-3, betas=(0.9, 0.95), eps=1e-8),
            "muon-fp32": MuonAdamW(groups(muon), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, ns_dtype=torch.float32)}


def timed(fn) -> float:
    if dist.is_initialized():
        dist.barrier()
    start = time.perf_counter()
    fn()
    if dist.is_initialized():
        dist.barrier()
    return time.perf_counter() - start


def measure(args, world_size: int) -> dict[str, float]:
    model = build(args, world_size)
    steppers = optimizers(model)
    times = {name: [] for name in (*steppers, "gathers")}
    matrices = [p for n, p in model.named_parameters() if n in muon_parameter_names(model)]
    for step in range(args.steps + 1):
        for name, optimizer in steppers.items():
            elapsed = timed(optimizer.step)
            if step:  # the first step allocates the states
                times[name].append(elapsed)
        if world_size > 1 and step:
            times["gathers"].append(timed(lambda: [p.grad.full_tensor() for p in matrices]))
    return {name: statistics.median(t) * 1e3 for name, t in times.items() if t}


def worker(rank: int, world_size: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    result = measure(args, world_size)
    if rank == 0:
        report(f"FSDP2, {world_size} processes", result)
    dist.destroy_process_group()


def report(label: str, ms: dict[str, float]) -> None:
    line = ", ".join(f"{name} {value:.1f} ms" for name, value in ms.items())
    print(f"{label}: {line}; Muon / AdamW step: bf16 {ms['muon'] / ms['adamw']:.2f}x, "
          f"fp32 {ms['muon-fp32'] / ms['adamw']:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, dim {args.dim}, {args.layers} layers (DIFF V2), 1 thread per process")
    report("1 process", measure(args, 1))
    mp.spawn(worker, args=(2, args), nprocs=2)


if __name__ == "__main__":
    main()
