"""Data pipeline throughput: does data loading keep up with training?

1. `prepare` throughput (tokens/s) with 1 and 2 workers, byte and BPE tokenizers, on the shared
   Shakespeare corpus (../shared/data/shakespeare, 42 works, ~5 MB).
2. Streaming throughput of TokenDataModule (batches/s, num_workers 0 and 2) against the training
   step (forward + backward) of the quickstart model on the same batch size.

Run:  LITDATA_DISABLE_VERSION_CHECK=1 PYTHONPATH=. python benchmarks/bench_data.py
Numbers vary with machine load; compare the rows of one run with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

import torch  # noqa: E402

from diffv2_lit.data.datamodule import TokenDataModule  # noqa: E402
from diffv2_lit.data.prepare import prepare  # noqa: E402
from diffv2_lit.data.sources import iter_all_documents, resolve_inputs  # noqa: E402
from diffv2_lit.data.tokenizer import train_bpe  # noqa: E402

# ../shared next to the checkout (main checkout: /work/main, worktrees: /work/wt/<name>).
_HERE = Path(__file__).resolve()
SHARED = next((p / "shared" / "data" / "shakespeare" for p in _HERE.parents
               if (p / "shared" / "data" / "shakespeare").is_dir()), Path("../shared/data/shakespeare"))


def bench_prepare(corpus: Path, work: Path, tokenizer: str, workers: int) -> tuple[int, float]:
    out = work / f"prep-{Path(tokenizer).stem}-{workers}"
    start = time.perf_counter()
    meta = prepare([str(corpus)], out, tokenizer=tokenizer, num_workers=workers, chunk_bytes="4MB",
                   verbose=False, overwrite=True)
    seconds = time.perf_counter() - start
    return sum(s["tokens"] for s in meta["splits"].values()), seconds


def bench_streaming(data_dir: Path, seq_len: int, batch_size: int, workers: int, n_batches: int) -> float:
    dm = TokenDataModule(data_dir=str(data_dir), seq_len=seq_len, batch_size=batch_size, num_workers=workers)
    dm.setup("fit")
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # worker start-up is a one-off cost, not throughput
    start = time.perf_counter()
    for _ in range(n_batches):
        next(iterator)
    return n_batches / (time.perf_counter() - start)


def bench_train_step(seq_len: int, batch_size: int, n_steps: int, device: str) -> float:
    from diffv2_lit.model import ModelConfig, Transformer

    model = Transformer(ModelConfig.from_preset("quickstart")).to(device)
    model.init_weights()
    batch = torch.randint(0, 259, (batch_size, seq_len + 1), device=device)
    inputs, targets = batch[:, :-1], batch[:, 1:]

    def step():
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten())
        loss.backward()

    step()  # warm-up
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(n_steps):
        step()
    sync()
    return n_steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=SHARED)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--bpe-vocab", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stream-batches", type=int, default=300)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bpe = work / "bpe.json"
        start = time.perf_counter()
        docs = iter_all_documents(resolve_inputs([str(args.corpus)]))
        train_bpe(docs, args.bpe_vocab, show_progress=False).save(str(bpe))
        print(f"train-tokenizer: BPE vocab {args.bpe_vocab} in {time.perf_counter() - start:.1f} s")

        print("\nprepare throughput")
        print(f"{'tokenizer':<10} {'workers':>7} {'tokens':>10} {'seconds':>8} {'tokens/s':>12}")
        results = {}
        for tokenizer, name in (("byte", "byte"), (str(bpe), f"bpe-{args.bpe_vocab}")):
            for workers in (1, 2):
                tokens, seconds = bench_prepare(args.corpus, work, tokenizer, workers)
                results[(name, workers)] = tokens / seconds
                print(f"{name:<10} {workers:>7} {tokens:>10,} {seconds:>8.2f} {tokens / seconds:>12,.0f}")

        print(f"\nstreaming vs training step (seq_len {args.seq_len}, batch {args.batch_size}, byte data)")
        byte_dir = work / "prep-byte-1"
        for workers in (0, 2):
            rate = bench_streaming(byte_dir, args.seq_len, args.batch_size, workers, n_batches=args.stream_batches)
            print(f"TokenDataModule num_workers={workers}: {rate:>9,.0f} batches/s")
        step_rate = bench_train_step(args.seq_len, args.batch_size, 5 if args.device == "cpu" else 50, args.device)
        print(f"quickstart model fwd+bwd ({args.device}): {step_rate:>9,.2f} steps/s")
        print(json.dumps({f"prepare_{k[0]}_w{k[1]}_tokens_per_s": round(v) for k, v in results.items()}))


if __name__ == "__main__":
    main()
