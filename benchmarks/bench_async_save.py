"""How long training waits for a sharded (FSDP2) checkpoint: a synchronous save against a background one.

    python benchmarks/bench_async_save.py [--preset 125m] [--ranks 2] [--repeats 3] [--dir /tmp/bench_ckpt]

Two CPU processes (gloo) shard a model with FSDP2, take one AdamW step (so the optimizer state exists),
then save model and optimizer state with torch.distributed.checkpoint, alternating `save` (training
waits for the whole write) and `async_save` (training waits for the copy to host memory; a thread
writes, as `model.async_checkpoints` does). Prints the stall of each, their ratio, and the time the
background write took in all. The numbers go into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffv2_lit.model import ModelConfig, Transformer  # noqa: E402


def _state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    return {"state_dict": get_model_state_dict(model), "optimizer_0": get_optimizer_state_dict(model, optimizer)}


def _worker(rank: int, args) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(args.port))
    dist.init_process_group("gloo", rank=rank, world_size=args.ranks)
    torch.manual_seed(0)
    mesh = init_device_mesh("cpu", (args.ranks,))
    model = Transformer(ModelConfig.from_preset(args.preset, attention="diffv2"))
    model.init_weights()
    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, model.config.vocab_size, (1, 64))
    model(tokens, targets=tokens).backward()
    optimizer.step()
    group = dist.new_group(backend="gloo")
    stalls: dict[str, list[float]] = {"sync": [], "async": []}
    background: list[float] = []
    for repeat in range(args.repeats):
        for mode in ("sync", "async"):
            folder = Path(args.dir) / f"{mode}-{repeat}"
            dist.barrier()
            start = time.perf_counter()
            if mode == "sync":
                dcp.save(_state(model, optimizer), checkpoint_id=folder)
            else:
                future = dcp.async_save(_state(model, optimizer), checkpoint_id=folder, process_group=group)
            stalls[mode].append(time.perf_counter() - start)
            if mode == "async":
                future.result()
                background.append(time.perf_counter() - start)
    if rank == 0:
        bytes_written = sum(f.stat().st_size for f in (Path(args.dir) / "sync-0").iterdir())
        sync, asynchronous = statistics.median(stalls["sync"]), statistics.median(stalls["async"])
        print(f"{args.preset} DIFF V2, {args.ranks} ranks, {bytes_written / 2**20:.0f} MiB per checkpoint "
              f"(model + AdamW state), median of {args.repeats}:")
        print(f"  synchronous save: training waits {sync:.2f} s")
        print(f"  background save:  training waits {asynchronous:.2f} s (write done after "
              f"{statistics.median(background):.2f} s)")
        print(f"  stall ratio background / synchronous: {asynchronous / sync:.2f}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args()
    owned = args.dir is None
    args.dir = args.dir or tempfile.mkdtemp(prefix="bench_async_save_")
    try:
        mp.spawn(_worker, args=(args,), nprocs=args.ranks)
    finally:
        if owned:
            shutil.rmtree(args.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
