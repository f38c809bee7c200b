"""Run `python -m diffv2_lit fit` as a real process and read back what it logged."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).parents[2]
TINY = Path(__file__).with_name("tiny.yaml")
MAX_STEPS = 12


def env(tmp_path: Path) -> dict:
    # One thread: deterministic reductions (identical losses across processes) and kind to shared CPUs.
    return {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
            "DIFFV2_LIT_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}


def fit_args(*extra: str) -> list[str]:
    return [sys.executable, "-m", "diffv2_lit", "fit", "--config", str(TINY), *extra]


def fit(tmp_path: Path, *extra: str, timeout: float = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(fit_args(*extra), cwd=tmp_path, env={**env(tmp_path), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def diffv2_lit(tmp_path: Path, *args: str, extra_env: dict | None = None,
               timeout: float = 300) -> subprocess.CompletedProcess:
    """Any subcommand through the installed `diffv2-lit` console script (run in tmp_path)."""
    script = Path(sys.executable).with_name("diffv2-lit")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "diffv2_lit"]  # not installed: same main()
    return subprocess.run([*command, *args], cwd=tmp_path, env={**env(tmp_path), **(extra_env or {})},
                          capture_output=True, text=True, timeout=timeout)


def start(tmp_path: Path, *extra: str, extra_env: dict | None = None, log_name: str = "killed.log") -> subprocess.Popen:
    log = open(tmp_path / log_name, "w")
    return subprocess.Popen(fit_args(*extra), cwd=tmp_path, env={**env(tmp_path), **(extra_env or {})}, stdout=log,
                            stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if process.poll() is not None:
            raise AssertionError(f"the run ended (exit {process.returncode}) before the fault could be injected")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("timed out waiting to inject the fault")
        time.sleep(0.05)


def step_reached(marker: Path, step: int):
    def reached() -> bool:
        try:
            return int(marker.read_text() or -1) >= step
        except (FileNotFoundError, ValueError):
            return False
    return reached


def kill(process: subprocess.Popen, signum: int = signal.SIGKILL, timeout: float = 120) -> int:
    process.send_signal(signum)
    return process.wait(timeout=timeout)


def run_dir(tmp_path: Path, version: int) -> Path:
    return tmp_path / "runs" / "faults" / f"version_{version}"


def scalars(directory: Path, tag: str) -> dict[int, float]:
    events = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return {}
    return {e.step: e.value for e in events.Scalars(tag)}


def output(result: subprocess.CompletedProcess) -> str:
    return result.stdout + result.stderr


def tool(tmp_path: Path, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`diffv2-lit generate|export|consolidate ...` in this process, through the same `main` the console
    script calls (no training happens: each tool is a plain function). Seconds faster than a process."""
    import contextlib
    import io

    from diffv2_lit.cli import main

    assert args[0] in ("generate", "export", "consolidate"), args
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update(extra_env or {})
    os.chdir(tmp_path)
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                main(list(args))
                code = 0
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return subprocess.CompletedProcess(["diffv2-lit", *args], code, stdout.getvalue(), stderr.getvalue())
