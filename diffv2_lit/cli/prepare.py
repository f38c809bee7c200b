"""`diffv2-lit prepare`: text files -> LitData token chunks (train and validation) + metadata.

    diffv2-lit prepare --input FILE_OR_FOLDER ... --output DIR_OR_S3_URL [--tokenizer byte|tokenizer.json]
        [--val-fraction F | --val-tokens N] [--seed 42] [--chunk-bytes 64MB | --chunk-size N] [--overwrite]

The layout it writes and how the split is made: `diffv2_lit.data.prepare`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from diffv2_lit.cli.errors import handled
from diffv2_lit.data.prepare import prepare

PROG = "diffv2-lit prepare"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,  # `--out` is a typo, not `--output`
        description="Tokenize text into LitData streaming chunks with a train/validation split.",
    )
    p.add_argument("--input", action="append", required=True,
                   help="file or folder of .txt/.txt.gz/.jsonl/.jsonl.gz/.parquet, or builtin:shakespeare; repeatable")
    p.add_argument("--output", required=True,
                   help="output folder or s3://bucket/prefix (refused if it holds anything, unless --overwrite); "
                        "S3 endpoint and credentials come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...")
    p.add_argument("--tokenizer", default="byte", help="'byte' or the path of a Hugging Face tokenizer.json")
    p.add_argument("--text-key", default="text", help="jsonl field / parquet column holding the text")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=None,
                     help="fraction of documents for validation (default 0.05)")
    val.add_argument("--val-tokens", type=int, default=None,
                     help="instead: the fewest documents holding at least this many validation tokens")
    p.add_argument("--seed", type=int, default=42, help="seed of the document split")
    chunk = p.add_mutually_exclusive_group()
    chunk.add_argument("--chunk-bytes", default=None, help="target chunk file size, e.g. 64MB (default)")
    chunk.add_argument("--chunk-size", type=int, default=None, help="instead: target tokens per chunk")
    p.add_argument("--num-workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder or prefix")
    p.add_argument("--quiet", action="store_true", help="no progress bars or progress lines (the summary stays)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)

    def body() -> None:
        prepare(args.input, args.output, tokenizer=args.tokenizer, text_key=args.text_key,
                val_fraction=0.05 if args.val_fraction is None else args.val_fraction, val_tokens=args.val_tokens,
                seed=args.seed, chunk_bytes=args.chunk_bytes, chunk_size=args.chunk_size,
                num_workers=args.num_workers, overwrite=args.overwrite, verbose=not args.quiet,
                command=shlex.join(["diffv2-lit", "prepare", *argv]))

    return handled(PROG, body)
