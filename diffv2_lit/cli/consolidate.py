"""`diffv2-lit consolidate`: a sharded (distributed) checkpoint folder -> one ordinary checkpoint file.

    diffv2-lit consolidate runs/125m/version_0/checkpoints/last.ckpt model.ckpt [--with-optimizer]
        [--trust-checkpoint]

The shards are merged on this machine's CPU into a file with Lightning's layout, which `fit --ckpt_path`,
`generate` and `export` read. Shards, index and `meta.pt` are read as data only: a folder that needs anything
more is refused unless --trust-checkpoint (or DIFFV2_LIT_TRUST_CHECKPOINTS=1).
"""

from __future__ import annotations

import argparse

from diffv2_lit.checkpoint.consolidate import consolidate
from diffv2_lit.checkpoint.safe_load import trusting
from diffv2_lit.cli.errors import handled

PROG = "diffv2-lit consolidate"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, allow_abbrev=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="sharded checkpoint folder (e.g. .../checkpoints/last.ckpt)")
    parser.add_argument("output", help="single-file checkpoint to write")
    parser.add_argument("--with-optimizer", action="store_true", help="also keep the optimizer state")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that needs more than data (runs code from it: trusted sources only)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def run() -> None:
        with trusting(args.trust_checkpoint):
            output = consolidate(args.checkpoint, args.output, args.with_optimizer)
        print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) from the shards in {args.checkpoint}")

    return handled(PROG, run)
