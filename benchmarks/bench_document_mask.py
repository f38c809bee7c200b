"""Forward + backward cost of document masking (data.document_mask) on vs off, in one interleaved run.

    python benchmarks/bench_document_mask.py                       # quickstart (16 x 128) and 125m (1 x 512)
    python benchmarks/bench_document_mask.py --repeats 5 --doc-len 64

For each shape and variant it times the training forward (fused loss) + backward of one model with
document ids (documents of --doc-len tokens, as a packed batch would hold) and without (the plain causal
call), interleaved, median over repeats, and prints on / off. Off is the code path of a run without
the key (no mask is built, the kernels get is_causal), so it is the baseline; only the ratios mean anything
on this shared machine. On the CPU the masked call is SDPA with a dense [B, 1, T, T] boolean mask.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffv2_lit.model import ModelConfig, Transformer

SHAPES = {"quickstart": (16, 128), "125m": (1, 512)}  # preset -> (batch, seq_len)


def training_step(model: Transformer, ids: torch.Tensor, document_ids: torch.Tensor | None):
    def step():
        if document_ids is None:
            loss = model(ids[:, :-1], targets=ids[:, 1:])
        else:
            loss = model(ids[:, :-1], targets=ids[:, 1:], document_ids=document_ids)
        loss.backward()
    return step


def time_interleaved(steps: dict, repeats: int) -> dict[str, float]:
    for step in steps.values():
        step()  # warm-up
    times = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():  # interleaved, so drift hits both alike
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=list(SHAPES))
    parser.add_argument("--variants", nargs="+", default=["baseline", "diffv2", "diffv1"])
    parser.add_argument("--doc-len", type=int, default=100, help="tokens per document in the masked batch")
    parser.add_argument("--seq-len", type=int, default=None, help="override every shape's sequence length")
    parser.add_argument("--batch-size", type=int, default=None, help="override every shape's batch")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, documents of {args.doc_len} tokens, "
          f"median of {args.repeats}, SDPA")
    print("\n| shape | variant | off ms | on ms | on / off |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        batch, seq_len = SHAPES.get(preset, (1, 128))
        batch, seq_len = args.batch_size or batch, args.seq_len or seq_len
        for variant in args.variants:
            config = ModelConfig.from_preset(preset, attention=variant, attn_backend="sdpa")
            model = Transformer(config)
            model.init_weights()
            ids = torch.randint(0, config.vocab_size, (batch, seq_len + 1))
            document_ids = (torch.arange(seq_len) // args.doc_len).expand(batch, -1)
            seconds = time_interleaved({"off": training_step(model, ids, None),
                                        "on": training_step(model, ids, document_ids)}, args.repeats)
            print(f"| {preset} {batch}x{seq_len} | {variant} | {1e3 * seconds['off']:.1f} | "
                  f"{1e3 * seconds['on']:.1f} | {seconds['on'] / seconds['off']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
