"""`UsageError`: a configuration that cannot work, raised by any layer (the module's schedule, the data-model
handshake, the CLI's own checks); `diffv2-lit fit|validate` prints it as one line and exits with code 2.

The other user-facing errors live with what they are about: `model.ConfigError` (a ModelConfig that
cannot be built), `data.folder.DataError` (missing or corrupt data), `checkpoint.CheckpointError` (a
checkpoint that cannot be used), `training.module.DivergedError` (a non-finite update)."""


class UsageError(ValueError):
    """A configuration that cannot work; the message names the key and the fix (exit code 2)."""
