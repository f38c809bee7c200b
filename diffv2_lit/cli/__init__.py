"""The `diffv2-lit` console script: one entry point, many subcommands.

`fit` and `validate` go to LightningCLI (the `lightning` console script that used to offer them
was removed in 2025). Every other subcommand is a plain function `main(argv)` in its own module of `cli/`,
imported only when it is called so that `diffv2-lit prepare --help` does not pay for importing
the whole training stack; errors become one line and their class's exit code in `cli/errors.py`.
"""

from __future__ import annotations

import importlib
import sys

from diffv2_lit.errors import EXIT_USAGE

LIGHTNING_SUBCOMMANDS = ("fit", "validate")

# subcommand -> (its module in cli/, whose `main(argv)` returns the exit code; one-line help)
TOOL_SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("diffv2_lit.cli.prepare", "turn text files into LitData token chunks"),
    "train-tokenizer": ("diffv2_lit.cli.train_tokenizer", "train a byte-level BPE tokenizer"),
    "generate": ("diffv2_lit.cli.generate", "sample text from a checkpoint or export"),
    "export": ("diffv2_lit.cli.export", "export a checkpoint to Hugging Face format"),
    "consolidate": ("diffv2_lit.cli.consolidate", "merge a sharded checkpoint into one file"),
    "compare": ("diffv2_lit.cli.compare", "overlay several runs in a Markdown/PNG report"),
    "plan": ("diffv2_lit.cli.plan", "a fit's batch, tokens and memory per GPU, before it runs"),
}


def _usage() -> str:
    lines = ["usage: diffv2-lit <subcommand> [options]", "", "training (LightningCLI):"]
    lines += [f"  {name:<16} see `diffv2-lit {name} --help`" for name in LIGHTNING_SUBCOMMANDS]
    lines += ["", "tools:"]
    lines += [f"  {name:<16} {help_}" for name, (_, help_) in TOOL_SUBCOMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return
    command = argv[0]
    if command in LIGHTNING_SUBCOMMANDS:
        from diffv2_lit.cli.fit import run_lightning_cli

        run_lightning_cli(argv)
        return
    if command not in TOOL_SUBCOMMANDS:
        print(f"diffv2-lit: unknown subcommand {command!r}\n\n{_usage()}", file=sys.stderr)
        sys.exit(EXIT_USAGE)  # as argparse reports them
    module_name, _ = TOOL_SUBCOMMANDS[command]
    sys.exit(importlib.import_module(module_name).main(argv[1:]))
