"""The one place a `DiffV2Error` becomes a line on stderr and an exit code (its class's `exit_code`,
docs/faults.md): every subcommand's `main` goes through `handled`."""

from __future__ import annotations

import sys
from collections.abc import Callable

from diffv2_lit.errors import DiffV2Error


def fail(prog: str, message: str, exit_code: int) -> int:
    """Print `PROG: error: MESSAGE` on stderr; returns `exit_code`."""
    sys.stderr.write(f"{prog}: error: {message}\n")
    sys.stderr.flush()
    return exit_code


def report(prog: str, error: DiffV2Error) -> int:
    """The error's line; returns its class's exit code."""
    return fail(prog, str(error), error.exit_code)


def handled(prog: str, body: Callable[[], int | None]) -> int:
    """Run a subcommand's body: its own code (0 when it returns None), or the code of the error it raised."""
    try:
        return body() or 0
    except DiffV2Error as error:
        return report(prog, error)
