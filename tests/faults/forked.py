"""`fit` and `start` of tests/faults/helpers.py, as children of the zygote (tests/zygote.py): the same real
`diffv2-lit fit` process with the same folder, environment and output, without its 10 s of imports."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests import zygote
from tests.faults.helpers import env, fit_args


def fit(tmp_path: Path, *extra: str, timeout: float = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return zygote.run(fit_args(*extra)[3:], tmp_path, {**env(tmp_path), **(extra_env or {})}, timeout=timeout)


def start(tmp_path: Path, *extra: str, extra_env: dict | None = None, log_name: str = "killed.log"):
    return zygote.start(fit_args(*extra)[3:], tmp_path, {**env(tmp_path), **(extra_env or {})}, tmp_path / log_name)


def diffv2_lit(tmp_path: Path, *args: str, extra_env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Any subcommand, as `diffv2-lit ARGS` in tmp_path (helpers.diffv2_lit runs the console script itself)."""
    return zygote.run(list(args), tmp_path, {**env(tmp_path), **(extra_env or {})}, timeout=timeout)
