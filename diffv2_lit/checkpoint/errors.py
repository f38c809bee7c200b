"""The errors of the checkpoint package: every entry point (fit, validate, generate, export, consolidate) turns
them into a one-line message and the exit code of their class (docs/faults.md)."""

from __future__ import annotations

from diffv2_lit.errors import EXIT_USAGE, DiffV2Error


class CheckpointError(DiffV2Error):
    """A checkpoint or export that cannot be used; the message names the path, what is wrong and what to do (exit 1:
    a run-time fault)."""


class CheckpointPathError(CheckpointError):
    """A checkpoint path that names nothing usable (it does not exist, or is not the kind of checkpoint the command
    takes): a mistake in the command (exit 2)."""

    exit_code = EXIT_USAGE


class ResumeError(CheckpointError):
    """A readable checkpoint of another model (shape or attention variant) than this run's."""
