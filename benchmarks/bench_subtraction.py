"""DIFF V2's pair subtraction `first - gate * second` in the compute dtype (bf16) or in fp32: speed and the
DIFF monitor's context-RMS reading (issue 20), on one DIFF V2 attention layer of the 125m shape.

    PYTHONPATH=. python benchmarks/bench_subtraction.py                 # CPU, bf16, 2048 tokens
    PYTHONPATH=. python benchmarks/bench_subtraction.py --seq-len 512 --repeats 3

Why it could matter: bf16 keeps 8 significant bits, so `first - gate * second` rounded in bf16 carries an
error of about 2^-9 |first|. Where a pair cancels (gate near 1, similar heads) the context is a small
fraction of |first|, and the monitor compares its RMS with a floor of 1/sqrt(n) of the values' RMS
(0.022 at n = 2048). Computing the subtraction in fp32 removes the rounding of the product and of the
difference, but not the bf16 rounding of `first` and `second` themselves: the attention kernel returns them
in bf16.

Speed: forward + backward of the layer (bf16 weights and activations, eager), the two subtractions
interleaved, median of `--repeats`. Reading: per (token, head), the normalised context RMS the monitor
computes (`context_rms`), against the same layer in fp64 on the same input; the median and p95 relative
error over the second half of the tokens (n >= T/2), and the monitor's `context_rms_norm_p05` and
`below_floor_frac` (its default floor_margin 0.5). Scenarios: `init` (the model's initialisation: sigmoid(lambda) near 0.5, random
heads) and `cancel` (each pair's second query = the first + 10 % noise, sigmoid(lambda) near 0.95: a pair
that learned to cancel most of a common signal, the case the floor watches).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffv2_lit.callbacks import DiffMonitor
from diffv2_lit.callbacks.diff_monitor import context_rms, context_stats
from diffv2_lit.model import ModelConfig
from diffv2_lit.model.attention import DiffV2Attention
from diffv2_lit.model.rope import rope_cos_sin


class Fp32SubtractionAttention(DiffV2Attention):
    """DIFF V2 with its pair subtraction computed in fp32 and the result cast back to the compute dtype."""

    @staticmethod
    def _subtract_pairs(out, gate):
        first, second = out.unflatten(2, (-1, 2)).unbind(3)
        return (first.float() - gate.unsqueeze(-1).float() * second.float()).to(out.dtype)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="125m")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    return parser.parse_args(argv)


def build_layer(config: ModelConfig, scenario: str) -> DiffV2Attention:
    torch.manual_seed(0)
    layer = DiffV2Attention(config, layer_idx=0)
    layer.init_weights(config.init_std, config.init_std / 2)
    if scenario == "cancel":
        with torch.no_grad():
            q = layer.q_proj.weight.view(config.n_query_heads, config.head_dim, config.dim)
            q[1::2] = q[0::2] + 0.1 * q[1::2]
            layer.lambda_proj.weight.zero_()  # sigmoid(3) = 0.95 for every token: inputs are RMS-normalised
            layer.lambda_proj.weight[:, 0] = 3.0
    return layer.eval()


def with_class(layer: DiffV2Attention, cls: type, dtype: torch.dtype) -> DiffV2Attention:
    """A copy of `layer` in `dtype` whose subtraction is `cls`'s (same parameters)."""
    twin = cls(layer.config, layer.layer_idx)
    twin.load_state_dict(layer.state_dict())
    return twin.to(dtype).eval()


def inputs(config: ModelConfig, seq_len: int, scenario: str) -> torch.Tensor:
    x = torch.randn(1, seq_len, config.dim, generator=torch.Generator().manual_seed(1))
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()  # what RMSNorm hands attention
    if scenario == "cancel":
        x[..., 0] = 1.0  # lambda_proj reads this feature: sigmoid(lambda) = sigmoid(3)
    return x


@torch.no_grad()
def readings(layer: DiffV2Attention, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """(normalised context RMS [B, T, h], the monitor's context statistics) of one diagnostic forward."""
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), layer.config.head_dim, layer.config.rope_theta, x.dtype)
    layer.diagnostics = {}
    try:
        layer(x, cos, sin)
        record = layer.diagnostics
    finally:
        layer.diagnostics = None
    _, normalised = context_rms(record["context"].double(), record["values"].double())
    stats = context_stats(record["context"], record["values"], floor_margin=DiffMonitor().floor_margin)
    return normalised, {name: float(stats[name]) for name in ("context_rms_norm_p05", "below_floor_frac")}


def step_seconds(layer: DiffV2Attention, x: torch.Tensor) -> float:
    cos, sin = rope_cos_sin(torch.arange(x.shape[1]), layer.config.head_dim, layer.config.rope_theta, x.dtype)
    x = x.detach().requires_grad_()
    start = time.perf_counter()
    layer(x, cos, sin).float().pow(2).mean().backward()
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    config = ModelConfig.from_preset(args.preset, attention="diffv2", attn_backend="sdpa")
    config = config.replace(max_seq_len=max(config.max_seq_len, args.seq_len))
    kinds = {"bf16": DiffV2Attention, "fp32": Fp32SubtractionAttention}
    print(f"\nDIFF V2 pair subtraction, {args.preset} attention layer, T={args.seq_len}, CPU bf16, "
          f"{torch.get_num_threads()} threads")
    print("\n| scenario | subtraction | fwd+bwd ms | vs bf16 | rel. error of context RMS (median / p95, n >= T/2) "
          "| context_rms_norm_p05 | below_floor_frac |")
    print("|---|---|---|---|---|---|---|")
    for scenario in ("init", "cancel"):
        layer, x = build_layer(config, scenario), inputs(config, args.seq_len, scenario)
        reference, reference_stats = readings(with_class(layer, DiffV2Attention, torch.float64), x.double())
        layers = {kind: with_class(layer, cls, torch.bfloat16) for kind, cls in kinds.items()}
        xb = x.bfloat16()
        times = {kind: [] for kind in kinds}
        for kind in kinds:
            step_seconds(layers[kind], xb)  # warm-up
        for _ in range(args.repeats):
            for kind in kinds:  # interleaved: machine noise hits both alike
                times[kind].append(step_seconds(layers[kind], xb))
        medians = {kind: statistics.median(t) for kind, t in times.items()}
        half = args.seq_len // 2
        print(f"| {scenario} | fp64 reference | | | | {reference_stats['context_rms_norm_p05']:.4f} | "
              f"{reference_stats['below_floor_frac']:.4f} |")
        for kind in kinds:
            normalised, stats = readings(layers[kind], xb)
            error = ((normalised - reference) / reference).abs()[:, half:].flatten().float()
            print(f"| {scenario} | {kind} | {1000 * medians[kind]:.0f} | {medians['bf16'] / medians[kind]:.3f} | "
                  f"{error.median():.2e} / {error.quantile(0.95):.2e} | {stats['context_rms_norm_p05']:.4f} | "
                  f"{stats['below_floor_frac']:.4f} |")


if __name__ == "__main__":
    main()
