"""`diffv2-lit compare`: several runs' curves and numbers in one Markdown report with PNG charts.

    diffv2-lit compare RUN_OR_FOLDER ... --output REPORT_DIR

What the report holds: `diffv2_lit.compare`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffv2_lit.cli.errors import handled
from diffv2_lit import compare
from diffv2_lit.compare import CompareError, find_run_dirs, group_runs, load_runs, write_report

PROG = "diffv2-lit compare"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, allow_abbrev=False, description=compare.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders holding runs")
    parser.add_argument("--output", type=Path, required=True, help="report folder (report.md + PNG charts)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> None:
        runs = load_runs(find_run_dirs(args.runs))
        if not runs:
            raise CompareError(f"no run with logged values under {', '.join(map(str, args.runs))}: every run "
                               "folder was skipped (see the warnings above).")
        groups = group_runs(runs)
        page = write_report(groups, args.output)
        print(f"compared {len(runs)} run folders in {len(groups)} groups; report written to {page}")

    return handled(PROG, body)
