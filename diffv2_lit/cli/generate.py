"""`diffv2-lit generate`: sample text from a checkpoint or an exported folder, with the KV cache.

    diffv2-lit generate --ckpt PATH (--prompt TEXT ... | --prompt-file FILE) [--tokenizer SPEC]
        [--max-new-tokens 200] [--temperature 0.8] [--top-k K] [--top-p P] [--seed 0]
        [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16|float16] [--ignore-eos] [--trust-checkpoint]

PATH is a Lightning .ckpt file, a sharded (FSDP2) checkpoint directory or a `diffv2-lit export` folder. What
the flags do: `diffv2_lit.inference.generate`.
"""

from __future__ import annotations

import argparse

from diffv2_lit.checkpoint.safe_load import trusting
from diffv2_lit.cli.errors import handled
from diffv2_lit.inference.generate import DTYPES, run
from diffv2_lit.inference.decoding import DECODE_MODES

PROG = "diffv2-lit generate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt file, sharded checkpoint dir, or export folder")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that needs more than data (runs code from it: trusted sources only)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text (repeat for a batch; '' starts a document)")
    prompts.add_argument("--prompt-file", help="file with one prompt per line (a batch)")
    parser.add_argument("--tokenizer", help="'byte' or a tokenizer.json (default: the one recorded in the checkpoint)")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES], help="auto: bfloat16 on CUDA, else float32")
    parser.add_argument("--ignore-eos", action="store_true", help="keep sampling after the end-of-text token")
    parser.add_argument("--decode", default="auto", choices=["auto", *DECODE_MODES],
                        help="auto: cuda-graphs on CUDA (a static KV cache and a captured one-token step, compiled "
                             "once), eager on the CPU (where compiling costs more than short generations save)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        with trusting(args.trust_checkpoint):
            run(args)

    return handled(PROG, body)
