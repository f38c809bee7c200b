"""The data package's errors (their exit codes: docs/faults.md)."""

from __future__ import annotations

from diffv2_lit.errors import EXIT_USAGE, DiffV2Error


class DataError(DiffV2Error, ValueError):
    """Data that cannot be used (missing, corrupt, changed while read, not what the checkpoint was trained on); the
    message says how to fix it (exit 1)."""


class DataSettingError(DataError):
    """A data setting that cannot work (a number out of range, a malformed mix, an unusable tokenizer, URL or S3
    access): a configuration mistake (exit 2)."""

    exit_code = EXIT_USAGE


class InputError(DiffV2Error, ValueError):
    """An input of `prepare` or `train-tokenizer` that cannot be read (missing, unsupported, not UTF-8, truncated,
    a value that is not text); the message names the file and the fix (exit 2)."""

    exit_code = EXIT_USAGE
