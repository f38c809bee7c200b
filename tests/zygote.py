"""Real `diffv2-lit` processes without paying the imports each time (issue 21.7: the suite's time).

A `python -m diffv2_lit` process spends about 10 s of CPU importing torch, Lightning (which imports all of
torchmetrics, and with it transformers, torchvision and scipy) and LitData before it reads its arguments. The
zygote is one Python process per test process that does those imports once and then forks a child for each
run: a separate OS process with its own pid, argv, working directory, environment, stdout/stderr files and
exit status, that runs the same `diffv2_lit.cli.main` `python -m diffv2_lit` runs. Nothing else happens in the
zygote before a fork (no torch op, no Trainer, no pytest), so a child starts as a fresh process would after its
imports. Lightning's own launcher (`trainer.devices 2`) still starts the other ranks as `python -m diffv2_lit`.

Use it where the process start is not what a test checks; the console script itself, import-time behaviour
and environment variables read at import stay plain subprocesses (`run` falls back to one by itself when the
environment differs from the zygote's in such a variable).
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Environment variables that libraries read at import time: a run that sets them differently gets a process
# of its own. Everything else (DIFFV2_LIT_*, AWS_*, PYTHONUNBUFFERED, ...) is read while the command runs.
IMPORT_TIME_PREFIXES = ("LITDATA_", "TORCH", "PYTORCH", "CUDA", "MKL", "PL_", "LIGHTNING", "JSONARGPARSE", "HF_",
                        "TRANSFORMERS", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONWARNINGS", "PYTHONDONTWRITEBYTECODE")

SERVER = r'''
import importlib.util, json, os, signal, sys, threading, traceback
import torch, lightning, litdata  # noqa: F401  (the imports every run pays)
import diffv2_lit.cli, diffv2_lit.cli.fit  # noqa: F401
import torch.utils.tensorboard  # noqa: F401  (the loggers' writer: imported by every run that logs)

requests, replies = os.fdopen(int(sys.argv[1]), "r"), os.fdopen(int(sys.argv[2]), "w", buffering=1)
pending = {}  # pid -> file for its exit status


def reap(*_):
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = pending.pop(pid, None)
        if path:
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            with open(path + ".tmp", "w") as f:
                f.write(str(code))
            os.replace(path + ".tmp", path)


def child(request):
    for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGALRM):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    requests.close(); replies.close()
    os.chdir(request["cwd"])
    os.environ.clear(); os.environ.update(request["env"])
    null = os.open(os.devnull, os.O_RDONLY); os.dup2(null, 0); os.close(null)
    out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = out if request["stderr"] is None else os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1); os.dup2(err, 2)
    if "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    # Lightning reads the process's rank from RANK / LOCAL_RANK / SLURM_PROCID when it is imported: read it again.
    from lightning.fabric.utilities.rank_zero import _get_rank, rank_zero_only
    rank_zero_only.rank = _get_rank() or 0
    script = request.get("script")
    if script is None:  # `python -m diffv2_lit ARGS`: what Lightning's launcher reruns for ranks 1, 2, ...
        main_spec = importlib.util.find_spec("diffv2_lit.__main__")
        sys.modules["__main__"].__spec__ = main_spec
        sys.argv = [main_spec.origin, *request["args"]]
        sys.path[0] = os.getcwd()
    else:  # `python SCRIPT ARGS`: runpy gives it a __main__ without a spec, so the launcher reruns the script
        sys.argv = [script, *request["args"]]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
    code = 0
    try:
        if script is None:
            diffv2_lit.cli.main(request["args"])
        else:
            import runpy
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exit_:
        if exit_.code is None or isinstance(exit_.code, int):
            code = exit_.code or 0
        else:
            print(exit_.code, file=sys.stderr); code = 1
    except KeyboardInterrupt:
        traceback.print_exc(); code = -signal.SIGINT
    except BaseException:
        traceback.print_exc(); code = 1
    threading._shutdown()  # as the interpreter does at exit: non-daemon threads, then atexit
    import atexit; atexit._run_exitfuncs()
    sys.stdout.flush(); sys.stderr.flush()
    if code == -signal.SIGINT:  # an uncaught KeyboardInterrupt ends a Python process by SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL); os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


signal.signal(signal.SIGCHLD, reap)
replies.write("ready\n")
for line in requests:
    request = json.loads(line)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})  # register the pid before its exit is reaped
    pid = os.fork()
    if pid == 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
        child(request)
    pending[pid] = request["status"]
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    reap()
    replies.write(f"{pid}\n")
'''


def base_env() -> dict:
    """The environment the zygote imports under: the tests' usual one for `diffv2-lit` processes."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
            "PYTHONUNBUFFERED": "1"}


class _Zygote:
    def __init__(self) -> None:
        self.env = base_env()
        request_read, self._requests = os.pipe()
        self._replies, reply_write = os.pipe()
        self.process = subprocess.Popen([sys.executable, "-c", SERVER, str(request_read), str(reply_write)],
                                        env=self.env, cwd=ROOT, pass_fds=(request_read, reply_write),
                                        stdin=subprocess.DEVNULL)
        os.close(request_read)
        os.close(reply_write)
        self._requests = os.fdopen(self._requests, "w", buffering=1)
        self._replies = os.fdopen(self._replies, "r")
        if self._replies.readline().strip() != "ready":
            raise RuntimeError(f"the zygote did not start (exit {self.process.wait()})")

    def fork(self, request: dict) -> int:
        self._requests.write(json.dumps(request) + "\n")
        return int(self._replies.readline())

    def close(self) -> None:
        self._requests.close()
        self.process.wait(timeout=60)


_zygote: _Zygote | None = None


def _get() -> _Zygote:
    global _zygote
    if _zygote is None or _zygote.process.poll() is not None:
        _zygote = _Zygote()
        atexit.register(_zygote.close)
    return _zygote


def _same_at_import(env: dict, reference: dict) -> bool:
    keys = {k for k in set(env) | set(reference) if k.startswith(IMPORT_TIME_PREFIXES)}
    keys |= {"OMP_NUM_THREADS"} - set(env)  # set per child, but a run without it wants torch's default
    return all(env.get(k) == reference.get(k) for k in keys)


class Forked:
    """A `subprocess.Popen`-like handle on one forked `diffv2-lit` process (pid, poll, wait, send_signal)."""

    def __init__(self, args: list[str], cwd: Path, env: dict, stdout: Path, stderr: Path | None,
                 script: Path | None = None) -> None:
        self._folder = tempfile.mkdtemp(prefix="zygote-")
        self._status = os.path.join(self._folder, "status")
        self.args, self.returncode = [str(script) if script else "diffv2-lit", *args], None
        self.pid = _get().fork({"args": list(args), "cwd": str(cwd), "env": env, "stdout": str(stdout),
                                "stderr": None if stderr is None else str(stderr), "status": self._status,
                                "script": None if script is None else str(script)})

    def poll(self) -> int | None:
        if self.returncode is None and os.path.exists(self._status):
            self.returncode = int(Path(self._status).read_text())
            shutil.rmtree(self._folder, ignore_errors=True)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.02)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def start(args: list[str], cwd: Path, env: dict, stdout: Path, stderr: Path | None = None,
          script: Path | None = None):
    """`python -m diffv2_lit ARGS` (or `python SCRIPT ARGS`) in `cwd` writing to `stdout` (and `stderr`, or the
    same file): a forked child of the zygote, or a plain process where `env` differs in a variable read at
    import time."""
    if not _same_at_import(env, base_env()):
        out = open(stdout, "w")
        err = subprocess.STDOUT if stderr is None else open(stderr, "w")
        command = [sys.executable, *([str(script)] if script else ["-m", "diffv2_lit"]), *args]
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=out, stderr=err, text=True)
    return Forked(list(args), Path(cwd), env, Path(stdout), None if stderr is None else Path(stderr), script)


def run(args: list[str], cwd: Path, env: dict, timeout: float = 300,
        script: Path | None = None) -> subprocess.CompletedProcess:
    """Like `subprocess.run([python, -m, diffv2_lit, *args], capture_output=True, text=True)`, or with
    `script`, `subprocess.run([python, SCRIPT, *args], ...)`."""
    folder = Path(tempfile.mkdtemp(prefix="zygote-run-"))
    process = start(args, cwd, env, folder / "stdout", folder / "stderr", script)
    try:
        code = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=60)
        raise
    try:
        return subprocess.CompletedProcess(["diffv2-lit", *args], code, (folder / "stdout").read_text(),
                                           (folder / "stderr").read_text())
    finally:
        shutil.rmtree(folder, ignore_errors=True)
