"""Decode speed with the KV cache: baseline vs DIFF V2 vs DIFF V1, and decode modes, in one run (not a timed test).

    PYTHONPATH=. python benchmarks/bench_decode.py                      # CPU, float32, the default table
    PYTHONPATH=. python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --decodes eager,cuda-graphs

Decode modes (`Transformer.generate(decode=...)`, `inference.decoding.Decoder`): `eager` grows a KVCache, `static` fills a StaticKVCache
(every step the same shapes), `compile` / `cuda-graphs` also compile the one-token step (CUDA graphs replay
it with one launch). Each mode is compared with the same variant's `eager` and each variant with the
baseline in the same mode.

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
import functools
import statistics
import time

import torch

from diffv2_lit.model import KVCache, ModelConfig, Transformer
from diffv2_lit.inference.decoding import Decoder

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
    parser.add_argument("--decodes", default="eager,static",
                        help="comma-separated decode modes: eager, static, compile, cuda-graphs (CUDA)")
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


def filled_cache(model: Transformer, decoder: Decoder, batch: int, prompt_len: int, new_tokens: int):
    """A cache holding `prompt_len` positions of random keys and values (see the module docstring)."""
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    cache = decoder.new_cache(model.config, batch, prompt_len + new_tokens, device)
    shape = (batch, prompt_len, model.config.n_kv_heads, model.config.head_dim)
    cache.begin(prompt_len)
    for layer in range(model.config.n_layers):
        cache.update(layer, torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))
    cache.advance(prompt_len)
    return cache


def rewind(cache, prompt_len: int) -> None:
    """Back to the prompt: the previous repetition's entries get overwritten."""
    if isinstance(cache.length, torch.Tensor):
        cache.length.fill_(prompt_len)
    else:
        cache.length = prompt_len


@torch.no_grad()
def decode_seconds(model: Transformer, step, cache, prompt_len: int, new_tokens: int) -> float:
    """Time `new_tokens` greedy decode steps (`step(tokens, cache) -> logits [B, V]`) after `prompt_len` positions."""
    device = model.embed_tokens.weight.device
    token = torch.zeros(cache.shape[0], 1, dtype=torch.long, device=device)
    for _ in range(3):  # warm-up steps (allocator, kernel selection, compilation, graph capture), not timed
        rewind(cache, prompt_len)
        step(token, cache)
    rewind(cache, prompt_len)
    _sync(device)
    start = time.perf_counter()
    for _ in range(new_tokens):
        logits = step(token, cache)
        token = logits.argmax(-1, keepdim=True)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_case(shape: str, batch: int, args, new_tokens: int) -> list[dict]:
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    context = args.prompt_len + new_tokens + 1
    decodes = args.decodes.split(",")
    models = {v: build(shape, v, context, device, dtype) for v in VARIANTS}
    cases = [(v, d) for v in VARIANTS for d in decodes]
    decoders = {(v, d): Decoder(d) for v, d in cases}
    steps = {case: functools.partial(decoders[case].logits, models[case[0]]) for case in cases}
    caches = {case: filled_cache(models[case[0]], decoders[case], batch, args.prompt_len, new_tokens + 1)
              for case in cases}
    times = {case: [] for case in cases}
    for _ in range(args.reps):
        for case in cases:  # interleaved: noise from other processes hits all of them alike
            times[case].append(decode_seconds(models[case[0]], steps[case], caches[case], args.prompt_len, new_tokens))
    rows = []
    for variant, decode in cases:
        seconds = statistics.median(times[(variant, decode)])
        rows.append({"shape": shape, "batch": batch, "variant": variant, "decode": decode, "new_tokens": new_tokens,
                     "tok_s": batch * new_tokens / seconds, "ms_step": 1000 * seconds / new_tokens,
                     "kv_bytes": KVCache.bytes_per_token(models[variant].config, dtype)})
    by_case = {(r["variant"], r["decode"]): r for r in rows}
    for row in rows:
        row["ratio"] = row["tok_s"] / by_case[("baseline", row["decode"])]["tok_s"]
        row["vs_eager"] = row["tok_s"] / by_case[(row["variant"], decodes[0])]["tok_s"]
    return rows


def print_table(rows: list[dict], args) -> None:
    print(f"\ndecode, prompt {args.prompt_len}, device {args.device}, {args.dtype}, {torch.get_num_threads()} threads, "
          f"median of {args.reps} interleaved reps, torch {torch.__version__}\n")
    first = args.decodes.split(",")[0]
    print(f"| shape | batch | new tokens | variant | decode | tokens/s | ms/step | vs baseline | vs {first} | "
          "KV cache bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['new_tokens']} | {r['variant']} | {r['decode']} | {r['tok_s']:.1f} | "
              f"{r['ms_step']:.2f} | {r['ratio']:.2f} | {r['vs_eager']:.2f} | {r['kv_bytes']:,} |")


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
