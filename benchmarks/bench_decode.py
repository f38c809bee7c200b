"""Decode speed with the KV cache: baseline vs DIFF V2 vs DIFF V1, in one run (not a timed test).

    PYTHONPATH=. python benchmarks/bench_decode.py                      # CPU, float32, the default table
    PYTHONPATH=. python benchmarks/bench_decode.py --device cuda --dtype bfloat16

For each shape and batch size the three variants (same config but `attention`) decode `--new-tokens`
tokens one at a time after a `--prompt-len`-token context, with greedy sampling. Repetitions are
interleaved (baseline, diffv2, diffv1, baseline, ...) so that machine noise hits all three alike; the
table reports the median tokens/s and the ratio to the baseline.

What is timed: decode steps only. The cache is filled with `--prompt-len` positions of random keys and
values instead of a real prefill: a decode step's cost depends on how many positions it reads, not on
their contents, and a 16 x 512-token prefill of the 125m shape costs minutes on two CPU cores. Each
repetition rewinds the cache to the prompt length. Models are randomly initialised (speed only).
max_seq_len is raised to prompt + new tokens where the preset's context is shorter (quickstart: 512).

KV-cache bytes per token (all layers, keys + values) come from `KVCache.bytes_per_token`: DIFF V2's
is the baseline's (only the query heads double); DIFF V1 also stores h_kv * d per token, but each
step reads it through two attention calls (q1 over k1, q2 over k2, each with 2d-wide values).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffv2_lit.model import KVCache, ModelConfig, Transformer

VARIANTS = ("baseline", "diffv2", "diffv1")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="quickstart,125m")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--new-tokens-125m", type=int, default=None,
                        help="fewer decode steps for the 125m shape (CPU time); default: --new-tokens")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (1 is steadier on a machine shared with other jobs)")
    return parser.parse_args(argv)


def build(shape: str, attention: str, context: int, device, dtype) -> Transformer:
    preset = ModelConfig.from_preset(shape)
    config = preset.replace(attention=attention, max_seq_len=max(preset.max_seq_len, context), attn_backend="auto")
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device=device)
    model.init_weights()
    return model.to(dtype).eval()


def filled_cache(model: Transformer, batch: int, prompt_len: int, new_tokens: int) -> KVCache:
    cache = model.new_cache(batch, prompt_len + new_tokens, dtype=model.embed_tokens.weight.dtype)
    for keys, values in zip(cache.keys, cache.values):
        keys[:, :prompt_len].normal_()
        values[:, :prompt_len].normal_()
    cache.length = prompt_len
    return cache


@torch.no_grad()
def decode_seconds(model: Transformer, cache: KVCache, prompt_len: int, new_tokens: int) -> float:
    """Time `new_tokens` greedy decode steps from a cache holding `prompt_len` positions."""
    cache.length = prompt_len  # rewind: the previous repetition's entries get overwritten
    device = model.embed_tokens.weight.device
    token = torch.zeros(cache.keys[0].shape[0], 1, dtype=torch.long, device=device)
    logits = model(token, cache)  # warm-up step (allocator, kernel selection), not timed
    cache.length = prompt_len
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = model(token, cache)
        token = logits[:, -1].argmax(-1, keepdim=True)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(shape: str, batch: int, args, new_tokens: int) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    context = args.prompt_len + new_tokens + 1
    models = {v: build(shape, v, context, device, dtype) for v in VARIANTS}
    caches = {v: filled_cache(m, batch, args.prompt_len, new_tokens + 1) for v, m in models.items()}
    times = {v: [] for v in VARIANTS}
    for _ in range(args.reps):
        for variant in VARIANTS:  # interleaved: noise from other processes hits all three alike
            times[variant].append(decode_seconds(models[variant], caches[variant], args.prompt_len, new_tokens))
    rows = []
    for variant in VARIANTS:
        seconds = statistics.median(times[variant])
        rows.append({"shape": shape, "batch": batch, "variant": variant, "new_tokens": new_tokens,
                     "tok_s": batch * new_tokens / seconds, "ms_step": 1000 * seconds / new_tokens,
                     "kv_bytes": KVCache.bytes_per_token(models[variant].config, dtype)})
    base = rows[0]["tok_s"]
    for row in rows:
        row["ratio"] = row["tok_s"] / base
    return rows


def print_table(rows: list[dict], args) -> None:
    print(f"\ndecode, prompt {args.prompt_len}, device {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved reps, torch {torch.__version__}\n")
    print("| shape | batch | new tokens | variant | tokens/s | ms/step | vs baseline | KV cache bytes/token |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['new_tokens']} | {r['variant']} | {r['tok_s']:.1f} | "
              f"{r['ms_step']:.2f} | {r['ratio']:.2f} | {r['kv_bytes']:,} |")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for shape in args.shapes.split(","):
        new_tokens = args.new_tokens_125m if shape == "125m" and args.new_tokens_125m else args.new_tokens
        for batch in (int(b) for b in args.batches.split(",")):
            rows += bench_case(shape, batch, args, new_tokens)
            print(f"done: {shape} batch {batch}", flush=True)
    print_table(rows, args)


if __name__ == "__main__":
    main()
