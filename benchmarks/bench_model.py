"""Forward + backward cost of baseline vs DIFF V2 vs DIFF V1, in one run, as ratios.

    python benchmarks/bench_model.py                 # one block and the 125m model at seq 1024
    python benchmarks/bench_model.py --repeats 5 --seq-len 512

For each shape it times forward + backward of every variant, interleaving the variants and taking
the median over repeats (this machine is shared: only ratios measured in one run mean anything),
counts the activation bytes saved for backward (exact, via saved-tensor hooks), and prints the
time ratio, the FLOP ratio (diffv2_lit.model.flops) and the achieved-FLOP-rate ratio against the
baseline. A rate ratio near 1.0 means the extra FLOPs of a variant run as efficiently as the
baseline's; docs/design.md expects DIFF V2 within 5%.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.model.flops import block_training_flops_per_token, training_flops_per_token
from diffv2_lit.model.rope import rope_cos_sin
from diffv2_lit.model.transformer import Block

VARIANTS = ("baseline", "diffv2", "diffv1")


class SavedActivationMeter:
    """Bytes of distinct tensors autograd keeps for backward during one forward."""

    def __init__(self) -> None:
        self.storages: dict[int, int] = {}

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not isinstance(tensor, torch.nn.Parameter):
            storage = tensor.untyped_storage()
            self.storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def mebibytes(self) -> float:
        return sum(self.storages.values()) / 2**20


def block_step(config: ModelConfig, batch: int, seq_len: int):
    block = Block(config, layer_idx=0)
    block.init_weights(config.init_std, config.init_std)
    x = torch.randn(batch, seq_len, config.dim, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(seq_len), config.head_dim, config.rope_theta, x.dtype)
    return lambda: block(x, cos, sin).square().mean().backward()


def model_step(config: ModelConfig, batch: int, seq_len: int):
    model = Transformer(config)
    model.init_weights()
    ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1))

    def step():
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()

    return step


def measure(steps: dict, repeats: int) -> tuple[dict, dict]:
    memory = {}
    for name, step in steps.items():
        meter = SavedActivationMeter()
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
            step()  # also the warm-up
        memory[name] = meter.mebibytes
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # interleaved, so drift hits every variant alike
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, memory


def report(title: str, flops_per_token, configs: dict, seconds: dict, memory: dict, seq_len: int,
           tokens: int) -> None:
    print(f"\n## {title}\n")
    print("| variant | fwd+bwd ms | time ratio | FLOP ratio | FLOP-rate ratio | GFLOP/s | saved activations MiB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    flops = {name: flops_per_token(c, seq_len) * tokens for name, c in configs.items()}
    for name in configs:
        time_ratio = seconds[name] / seconds["baseline"]
        flop_ratio = flops[name] / flops["baseline"]
        print(f"| {name} | {1e3 * seconds[name]:.1f} | {time_ratio:.3f} | {flop_ratio:.3f} | "
              f"{flop_ratio / time_ratio:.3f} | {flops[name] / seconds[name] / 1e9:.1f} | {memory[name]:.1f} | "
              f"{memory[name] / memory['baseline']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="sdpa", choices=["sdpa", "eager"])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset}, "
          f"batch {args.batch} x seq {args.seq_len}, backend {args.backend}, median of {args.repeats}")
    configs = {v: ModelConfig.from_preset(args.preset, attention=v, attn_backend=args.backend) for v in VARIANTS}
    tokens = args.batch * args.seq_len
    block_configs = {v: c.replace(n_layers=1) for v, c in configs.items()}
    steps = {v: block_step(c, args.batch, args.seq_len) for v, c in block_configs.items()}
    report("one decoder block", block_training_flops_per_token, block_configs, *measure(steps, args.repeats), args.seq_len, tokens)
    steps = {v: model_step(c, args.batch, args.seq_len) for v, c in configs.items()}
    report(f"{args.preset} model", training_flops_per_token, configs, *measure(steps, args.repeats), args.seq_len, tokens)


if __name__ == "__main__":
    main()
