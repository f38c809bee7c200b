"""`diffv2-lit export`: a checkpoint -> a Hugging Face folder.

    diffv2-lit export --ckpt CHECKPOINT --output DIR [--tokenizer SPEC] [--dtype float32|bfloat16|float16]
        [--overwrite] [--trust-checkpoint]

What the folder holds and how transformers loads it: `diffv2_lit.inference.export`.
"""

from __future__ import annotations

import argparse

from diffv2_lit.checkpoint.safe_load import trusting
from diffv2_lit.cli.errors import handled
from diffv2_lit.inference.export import DTYPES, export, load_instructions

PROG = "diffv2-lit export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file, sharded checkpoint dir, or export folder")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that needs more than data (runs code from it: trusted sources only)")
    parser.add_argument("--output", required=True, help="folder to write (created; must be empty unless --overwrite)")
    parser.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the one recorded in the checkpoint)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="weight dtype (default: as stored in the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing export")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        with trusting(args.trust_checkpoint):
            folder = export(args.ckpt, args.output, args.tokenizer, DTYPES.get(args.dtype), args.overwrite)
        print(f"exported to {folder}")
        print("\n".join(load_instructions(folder)))

    return handled(PROG, body)
