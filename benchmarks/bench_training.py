"""Training benchmarks (not a test; run by hand, numbers go to docs/training.md).

1. Framework overhead: the same model, data and settings (AdamW, grad-norm logging, clipping, LR
   schedule) trained by `Trainer.fit(DecoderLM)` and by a plain PyTorch loop; tokens/s ratio
   (Lightning / plain, expect >= 0.97). Runs alternate (plain, Lightning, plain, Lightning, ...) and
   the median of each is compared, so load from other processes hits both alike.
2. Baseline vs DIFF V2 at the 125m shape (short sequences, a few steps): tokens/s and MFU, with the
   device's peak taken as the measured fp32 GEMM FLOP/s on CPU (or the dense bf16 table on GPU).

    python benchmarks/bench_training.py [--steps 30] [--repeats 3] [--skip-125m]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning as L
import torch

from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.model.flops import training_flops_per_token
from diffv2_lit.callbacks.throughput import device_peak_flops
from diffv2_lit.gradients import global_grad_norm
from diffv2_lit.training.module import DecoderLM, resolve_model_config
from diffv2_lit.training.optim import lr_multiplier, parameter_groups
from diffv2_lit.data.synthetic import SyntheticDataModule

OVERHEAD_MODEL = {"preset": "quickstart", "n_layers": 4, "dim": 128, "n_heads": 4, "n_kv_heads": 2, "head_dim": 32}
SEQ, BATCH, WARMUP_STEPS = 128, 16, 5


class _StepTimer(L.Callback):
    """Wall time from the end of step `start` to the end of the last step."""

    def __init__(self, start: int) -> None:
        self.start, self.t0, self.t1 = start, None, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.start:
            self.t0 = time.perf_counter()
        self.t1 = time.perf_counter()


def lightning_tokens_per_sec(steps: int) -> float:
    torch.manual_seed(0)
    module = DecoderLM(architecture=OVERHEAD_MODEL, lr=1e-3, warmup_steps=2, max_steps=steps)
    data = SyntheticDataModule(vocab_size=320, seq_len=SEQ, batch_size=BATCH, alphabet=256)
    timer = _StepTimer(WARMUP_STEPS)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        gradient_clip_val=1.0, callbacks=[timer])
    trainer.fit(module, data)
    return (steps - WARMUP_STEPS) * BATCH * SEQ / (timer.t1 - timer.t0)


def plain_tokens_per_sec(steps: int) -> float:
    """The same work written by hand: forward, fp32 loss, backward, grad norm, clip, AdamW, schedule."""
    torch.manual_seed(0)
    config = resolve_model_config(OVERHEAD_MODEL)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.init_weights()
    groups = [{k: v for k, v in g.items() if k != "names"} for g in parameter_groups(model, 0.1)]
    optimizer = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(s, "cosine", steps, 2, 0.1, 0.2))
    data = SyntheticDataModule(vocab_size=320, seq_len=SEQ, batch_size=BATCH, alphabet=256)
    loader = iter(data.train_dataloader())
    for step in range(steps):
        if step == WARMUP_STEPS:
            t0 = time.perf_counter()
        input_ids, targets = next(loader)
        loss = model(input_ids, targets=targets) / targets.numel()  # the fused-loss forward, as DecoderLM
        loss.backward()
        global_grad_norm(model.parameters()).item()  # logged every step in DecoderLM
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return (steps - WARMUP_STEPS) * BATCH * SEQ / (time.perf_counter() - t0)


def measured_cpu_peak_flops(size: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM FLOP/s of this CPU (the best of a few square matmuls): the CPU "peak" for MFU."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best


def variant_throughput(attention: str, seq: int, batch: int, steps: int, peak: float) -> dict:
    config = ModelConfig.from_preset("125m", attention=attention, tie_embeddings=True, max_seq_len=seq)
    torch.manual_seed(0)
    model = Transformer(config)
    model.init_weights()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (batch, seq + 1))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        (model(x[:, :-1], targets=x[:, 1:]) / x[:, 1:].numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    tokens_per_sec = batch * seq / statistics.median(times[1:])
    return {"tokens_per_sec": tokens_per_sec, "mfu": tokens_per_sec * training_flops_per_token(config, seq) / peak,
            "flops_per_token": training_flops_per_token(config, seq)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-125m", action="store_true")
    parser.add_argument("--skip-overhead", action="store_true")
    parser.add_argument("--seq-125m", type=int, default=128)
    parser.add_argument("--batch-125m", type=int, default=2)
    parser.add_argument("--steps-125m", type=int, default=4)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, lightning {L.__version__}, threads {torch.get_num_threads()}")

    if not args.skip_overhead:
        overhead(args.steps, args.repeats)
    if not args.skip_125m:
        compare_variants(args)


def overhead(steps: int, repeats: int) -> None:
    plain, lightning = [], []
    for _ in range(repeats):
        plain.append(plain_tokens_per_sec(steps))
        lightning.append(lightning_tokens_per_sec(steps))
    print(f"overhead model {OVERHEAD_MODEL}, batch {BATCH} x {SEQ}, {steps} steps x {repeats}")
    print(f"  plain loop  tokens/s: {[round(v) for v in plain]}  median {statistics.median(plain):.0f}")
    print(f"  Lightning   tokens/s: {[round(v) for v in lightning]}  median {statistics.median(lightning):.0f}")
    print(f"  ratio Lightning / plain: {statistics.median(lightning) / statistics.median(plain):.3f}")


def compare_variants(args: argparse.Namespace) -> None:
    """Alternate baseline and DIFF V2 `repeats` times; report medians."""
    peak = device_peak_flops(torch.device("cpu")) or measured_cpu_peak_flops()
    print(f"125m shape, batch {args.batch_125m} x {args.seq_125m}, peak (measured fp32 GEMM) {peak / 1e9:.0f} GFLOP/s")
    runs = {"baseline": [], "diffv2": []}
    for _ in range(args.repeats):
        for attention in runs:
            runs[attention].append(variant_throughput(attention, args.seq_125m, args.batch_125m, args.steps_125m, peak))
    results = {}
    for attention, rs in runs.items():
        tokens = statistics.median(r["tokens_per_sec"] for r in rs)
        results[attention] = r = {**rs[0], "tokens_per_sec": tokens, "mfu": tokens * rs[0]["flops_per_token"] / peak}
        print(f"  {attention:<8} tokens/s {r['tokens_per_sec']:.0f} (runs {[round(x['tokens_per_sec']) for x in rs]})  "
              f"MFU {r['mfu']:.3f}  FLOPs/token {r['flops_per_token'] / 1e6:.0f}M")
    ratio = results["diffv2"]["tokens_per_sec"] / results["baseline"]["tokens_per_sec"]
    print(f"  DIFF V2 / baseline tokens/s: {ratio:.3f}")


if __name__ == "__main__":
    main()
