"""`diffv2-lit train-tokenizer`: a byte-level BPE (Hugging Face `tokenizers`) trained on the user's files.

    diffv2-lit train-tokenizer --input FILE_OR_FOLDER ... --output tokenizer.json [--vocab-size 8192]
        [--min-frequency 2] [--text-key text] [--overwrite]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from diffv2_lit.cli.errors import handled
from diffv2_lit.data.sources import iter_all_documents, resolve_inputs
from diffv2_lit.data.tokenizer import EOS_TOKEN, HFTokenizer, train_bpe
from diffv2_lit.errors import UsageError

PROG = "diffv2-lit train-tokenizer"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False,  # `--out` is a typo, not `--output`
        description="Train a byte-level BPE tokenizer (Hugging Face `tokenizers`) and write tokenizer.json.",
    )
    parser.add_argument("--input", action="append", required=True,
                        help="file or folder (.txt, .jsonl, .jsonl.gz, .parquet) or builtin:shakespeare; repeatable")
    parser.add_argument("--output", required=True, help="path of the tokenizer.json to write (or a folder)")
    parser.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size incl. special tokens")
    parser.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge")
    parser.add_argument("--text-key", default="text", help="jsonl field / parquet column holding the text")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    return handled(PROG, lambda: train(args))


def train(args: argparse.Namespace) -> None:
    output = Path(args.output)
    if output.is_dir() or args.output.endswith("/"):
        output = output / "tokenizer.json"
    if output.exists() and not args.overwrite:
        raise UsageError(f"{output} exists; pass --overwrite to replace it")
    sources = resolve_inputs(args.input)
    tok = train_bpe(iter_all_documents(sources, args.text_key), args.vocab_size, args.min_frequency)
    output.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(output))
    ident = HFTokenizer(output).identity()
    print(f"wrote {output}: vocab {ident['vocab_size']}, EOS {EOS_TOKEN!r}, sha256 {ident['hash'][:16]}")
