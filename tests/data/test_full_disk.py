"""`prepare` onto a full disk, killed, or losing a worker (issue 24.2): a bounded exit with one line, no process
left behind, no partial folder left. Real processes; the full disk is a 2 MiB tmpfs (`mount -t tmpfs`, as root),
or, for a user who may not mount, the same tmpfs in a user+mount namespace of its own (`unshare -rm`)."""

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.data.conftest import ROOT

BOUND_S = 60  # imports, one pass over 5 MB of text, the watchdog's 5 s stall, the group's 3 s grace


def _text(folder: Path, files: int, words: int) -> Path:
    folder.mkdir()
    line = "shall i compare thee to a summer's day thou art more lovely and more temperate "
    for i in range(files):
        (folder / f"doc{i}.txt").write_text(f"document {i}: " + line * (words // 16))
    return folder


def _env(tag: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "DIFFV2_TEST_TAG": tag}


def _prepare(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffv2_lit", "prepare", *args]


def _tagged(tag: str) -> list[str]:
    """Command lines of the live processes carrying this run's tag in their environment (children inherit it)."""
    alive = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"DIFFV2_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                state = (environ.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    alive.append((environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            continue
    return alive


def _none_left(tag: str, within_s: float = 3.0) -> list[str]:
    deadline = time.monotonic() + within_s
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _tagged(tag)


def _on_a_small_disk(tmp_path: Path, command: list[str], tag: str) -> tuple[subprocess.CompletedProcess, float, str]:
    """Run `command` in tmp_path (its --output under small/) with a 2 MiB tmpfs mounted on small/; returns the
    result, its seconds and what small/ holds afterwards."""
    small = tmp_path / "small"
    small.mkdir()
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], check=True)
        try:
            start = time.monotonic()
            result = subprocess.run(command, cwd=tmp_path, env=_env(tag), capture_output=True, text=True,
                                    timeout=BOUND_S + 60)
            return result, time.monotonic() - start, " ".join(sorted(os.listdir(small)))
        finally:
            subprocess.run(["umount", "-l", str(small)], check=True)
    if shutil.which("unshare") is None:
        pytest.fail("mounting a small tmpfs needs root or `unshare` (util-linux) with user namespaces")
    # The mount lives in the namespace of this one shell, and goes with it.
    script = f'mount -t tmpfs -o size=2m tmpfs "{small}" && cd "{tmp_path}" && "$@"; code=$?; ' \
             f'echo "held: $(ls -A "{small}" | tr "\\n" " ")" >&2; exit $code'
    start = time.monotonic()
    result = subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", *command], env=_env(tag),
                            capture_output=True, text=True, timeout=BOUND_S + 60)
    lines = result.stderr.splitlines()
    result.stderr = "".join(line + "\n" for line in lines if not line.startswith("held: "))
    return result, time.monotonic() - start, next(line for line in lines if line.startswith("held: "))[6:].strip()


def test_a_full_disk_is_refused_before_writing(tmp_path):
    """The estimate from the text read for the split does not fit: nothing is started."""
    raw, tag = _text(tmp_path / "raw", files=10, words=50_000), uuid.uuid4().hex
    result, seconds, held = _on_a_small_disk(tmp_path, _prepare("--input", str(raw), "--output", "small/out",
                                                                "--num-workers", "1", "--quiet"), tag)
    tokens = sum(len(p.read_bytes()) + 1 for p in raw.iterdir())  # byte tokens: one per byte, one EOS per file
    assert result.returncode == 1 and seconds < BOUND_S
    assert result.stderr.splitlines() == [
        f"diffv2-lit prepare: error: not enough space for {tmp_path}/small/out (the output needs about "
        f"{2 * tokens / 2**20:.1f} MiB: {tokens:,} tokens x 2 bytes); its file system has 2.0 MiB free: free space "
        "there or choose another --output"]
    assert held == "" and _none_left(tag) == []


def test_a_disk_that_fills_up_while_writing_stops_the_writer(tmp_path):
    """No estimate without the split's pass (--val-tokens 0): LitData's writer deadlocked here with 64 MB chunks
    (3 of 3 runs); the watchdog stops it."""
    raw, tag = _text(tmp_path / "raw", files=10, words=50_000), uuid.uuid4().hex
    result, seconds, held = _on_a_small_disk(tmp_path, _prepare("--input", str(raw), "--output", "small/out",
                                                                "--num-workers", "1", "--quiet", "--val-tokens", "0"), tag)
    assert result.returncode == 1 and seconds < BOUND_S, result.stderr[-2000:]
    assert result.stderr.splitlines() == [
        f"diffv2-lit prepare: error: no space left on {tmp_path}/small (0.0 MiB free of 2.0 MiB) while writing "
        f"{tmp_path}/small/out; the writer was stopped and nothing was written: free space there or choose another "
        "--output"]
    assert held == "", "a partial folder was left on the full disk"
    assert _none_left(tag) == []


def _wait_for_writers(tag: str, process: subprocess.Popen, at_least: int) -> None:
    deadline = time.monotonic() + BOUND_S
    while len(_tagged(tag)) < at_least:
        assert process.poll() is None and time.monotonic() < deadline, "the writer never started"
        time.sleep(0.1)


def test_a_killed_prepare_leaves_no_process_and_its_folder_is_removed_next_time(tmp_path):
    raw, tag = _text(tmp_path / "raw", files=40, words=300_000), uuid.uuid4().hex
    process = subprocess.Popen(_prepare("--input", str(raw), "--output", "out", "--num-workers", "2", "--quiet",
                                        "--chunk-size", "100000"), cwd=tmp_path, env=_env(tag),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_writers(tag, process, at_least=4)  # prepare, its writer group's leader and LitData's workers
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert _none_left(tag) == []  # LitData's processes end with the run, not later
    (partial,) = tmp_path.glob(".out.partial-*")

    again, tag = _run_small(tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == f"[prepare] removed {partial}: left by a prepare run that was killed " \
                                           f"(pid {process.pid})"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["more", "out", "raw"]
    assert _none_left(tag, within_s=0.5) == []  # a run that ends normally leaves nothing either


def _run_small(tmp_path: Path) -> tuple[subprocess.CompletedProcess, str]:
    tag = uuid.uuid4().hex
    more = _text(tmp_path / "more", files=3, words=2_000)
    return subprocess.run(_prepare("--input", str(more), "--output", "out", "--num-workers", "2", "--quiet"),
                          cwd=tmp_path, env=_env(tag), capture_output=True, text=True, timeout=BOUND_S), tag


def test_a_tokenizer_process_that_dies_does_not_lose_documents_silently(tmp_path):
    """LitData counts a worker killed mid-run (the OOM killer) as done: the run once ended with half the data."""
    raw, tag = _text(tmp_path / "raw", files=40, words=300_000), uuid.uuid4().hex
    process = subprocess.Popen(_prepare("--input", str(raw), "--output", "out", "--num-workers", "2", "--quiet",
                                        "--chunk-size", "100000"), cwd=tmp_path, env=_env(tag),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_writers(tag, process, at_least=4)
    workers = [pid for pid in _tagged_pids(tag) if os.getpgid(pid) != pid and pid != process.pid]
    os.kill(workers[0], signal.SIGKILL)
    _, err = process.communicate(timeout=BOUND_S)
    assert process.returncode == 1
    assert err.startswith("diffv2-lit prepare: error: a tokenizer worker failed: documents were lost while "
                          "tokenizing (") and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]
    assert _none_left(tag) == []


def _tagged_pids(tag: str) -> list[int]:
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if f"DIFFV2_TEST_TAG={tag}".encode() in environ.read_bytes().split(b"\0"):
                pids.append(int(environ.parent.name))
        except OSError:
            continue
    return sorted(pids)
