"""Cost of the callbacks as a fraction of training time.

DiffMonitor: one diagnostic forward (eager attention, records, per-layer reductions) every
`--every-n-steps` optimizer steps, against a training step (forward + backward + AdamW) on the same
shapes: fraction = t_monitor / (every_n x t_step + t_monitor).
GradientSpikeDetector: its per-step work (global grad norm + one host sync) against a training step.

Both are ratios measured inside one process, so machine noise mostly cancels. Examples:
    python benchmarks/bench_monitor.py                                  # quickstart and 125m on CPU
    python benchmarks/bench_monitor.py --presets 125m --seq-len 2048 --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from diffv2_lit.callbacks import DiffMonitor
from diffv2_lit.gradients import global_grad_norm
from diffv2_lit.model import ModelConfig, Transformer


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median seconds of `repeats` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(preset: str, seq_len: int, batch_size: int, every_n: int, repeats: int, device: torch.device,
          dtype: torch.dtype) -> dict:
    config = ModelConfig.from_preset(preset, max_seq_len=max(seq_len, 16))
    torch.manual_seed(0)
    model = Transformer(config).to(device=device, dtype=dtype)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = torch.randint(0, config.vocab_size, (batch_size, seq_len + 1), device=device)

    def train_step() -> None:
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep grads allocated so the norm below has work to do

    monitor = DiffMonitor(every_n_steps=every_n)
    probe = tokens[: monitor.probe_batch_size, :-1]
    t_step = timed(train_step, repeats, device)
    t_monitor = timed(lambda: monitor.measure(model, probe), repeats, device)
    params = list(model.parameters())
    t_norm = timed(lambda: global_grad_norm(params).item(), repeats, device)
    return {"preset": preset, "seq_len": seq_len, "batch": batch_size, "params_m": sum(p.numel() for p in params) / 1e6,
            "t_step_s": t_step, "t_monitor_s": t_monitor, "monitor_frac": t_monitor / (every_n * t_step + t_monitor),
            "spike_frac": t_norm / t_step}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["quickstart", "125m"])
    parser.add_argument("--seq-len", type=int, nargs="+", default=[512, 512], help="one per preset")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[8, 1], help="one per preset")
    parser.add_argument("--every-n-steps", type=int, default=DiffMonitor().every_n_steps)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    print(f"device={device} dtype={args.dtype} every_n_steps={args.every_n_steps} torch={torch.__version__}")
    print("| preset | params (M) | batch x seq | train step (s) | monitor call (s) | monitor cost "
          "| spike-detector cost |")
    print("|---|---|---|---|---|---|---|")
    for preset, seq_len, batch in zip(args.presets, args.seq_len, args.batch_size):
        r = bench(preset, seq_len, batch, args.every_n_steps, args.repeats, device, dtype)
        print(f"| {r['preset']} | {r['params_m']:.1f} | {r['batch']} x {r['seq_len']} | {r['t_step_s']:.3f} | "
              f"{r['t_monitor_s']:.3f} | {100 * r['monitor_frac']:.2f}% | {100 * r['spike_frac']:.2f}% |", flush=True)


if __name__ == "__main__":
    main()
