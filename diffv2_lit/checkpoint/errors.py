"""The one error type of the checkpoint package: every entry point (fit, validate, generate, export,
consolidate) turns it into a one-line message."""

from __future__ import annotations


class CheckpointError(Exception):
    """A checkpoint or export that cannot be used; the message names the path, what is wrong and what to do."""


class ResumeError(CheckpointError):
    """A readable checkpoint of another model (shape or attention variant) than this run's."""
