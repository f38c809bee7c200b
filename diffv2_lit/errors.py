"""The project's errors share one base, `DiffV2Error`, whose class attribute `exit_code` is the code every
`diffv2-lit` subcommand exits with when the error reaches it (one handler: `cli/errors.py`; the table of codes
is in docs/faults.md):

- `EXIT_FAULT` (1): a run-time fault: a corrupt, damaged, untrusted or other model's checkpoint, a diverged
  run, missing or corrupt data, a full disk.
- `EXIT_USAGE` (2): bad usage or configuration: a wrong flag or value, a path that does not exist, bad data
  settings; nothing was started.

Each error lives with what it is about (`model.ConfigError`, `data.folder.DataError`,
`checkpoint.CheckpointError`, ...); `UsageError` is the one any layer raises for a configuration that cannot
work (the module's schedule, the data-model handshake, the CLI's own checks)."""

EXIT_FAULT = 1
EXIT_USAGE = 2


class DiffV2Error(Exception):
    """Base of the project's errors: the message names what is wrong and what to do; `exit_code` is the CLI's."""

    exit_code = EXIT_FAULT


class UsageError(DiffV2Error, ValueError):
    """A configuration that cannot work; the message names the key and the fix."""

    exit_code = EXIT_USAGE
