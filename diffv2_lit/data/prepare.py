"""Text files -> LitData token chunks (train and validation) + metadata: `prepare`, which `diffv2-lit prepare`
(cli/prepare.py) runs.

Output layout (`--output DIR`, or `--output s3://bucket/prefix` with the same layout under the prefix):
    DIR/train/         LitData folder written with `optimize(..., item_loader=TokensLoader())`
    DIR/val/           same, for the validation documents (absent when there are none)
    DIR/diffv2_data.json   tokenizer identity, token/document counts per split, sources, command

Every document is followed by exactly one EOS token, so documents are separated by one EOS.
The split is by document: a seeded hash of each document's key `(source_id, index)` orders the
documents, and the validation split takes the first ones of that order (a fraction of the documents
or enough documents for `--val-tokens`). The result does not depend on worker count or file order.

A local run writes into a hidden sibling folder and renames it at the very end, so an interrupted run
never leaves a folder that looks complete. Object storage has no rename: an s3:// run writes the
chunks under the final prefix and `diffv2_data.json` last, and readers treat a prefix without it as
holding no prepared data (see `remote.py`).
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import heapq
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from diffv2_lit.data.layout import FORMAT_NAME, FORMAT_VERSION, METADATA_FILE, PROGRESS_FILE, SPLITS
from diffv2_lit.data.remote import S3Prefix, is_url, process_alive
from diffv2_lit.data.sources import Source, iter_documents, resolve_inputs
from diffv2_lit.data.tokenizer import load_tokenizer, token_dtype
from diffv2_lit.data.writer import NoSpaceError, run_in_group
from diffv2_lit.errors import EXIT_USAGE, DiffV2Error

# Every file a prepare run writes, relative to its output: the metadata, the in-progress marker, and
# each split's LitData index (merged, and per worker while it runs) and chunks.
_PREPARE_WRITES = re.compile(
    rf"({re.escape(METADATA_FILE)}|{re.escape(PROGRESS_FILE)}|(train|val)/(index\.json|\d+[.-]index\.json|chunk-\d+-\d+\.bin))")



class PrepareError(DiffV2Error, RuntimeError):
    """A problem with the user's inputs or output folder; the message says how to fix it."""

    exit_code = EXIT_USAGE


class TokenizingFault(DiffV2Error, RuntimeError):
    """A tokenizer process failed or died while writing (exit 1); nothing was written."""


# ---------------------------------------------------------------- the pipeline

def prepare(
    inputs: list[str], output: str | Path, *, tokenizer: str = "byte", text_key: str = "text",
    val_fraction: float = 0.05, val_tokens: int | None = None, seed: int = 42,
    chunk_bytes: str | int | None = None, chunk_size: int | None = None, num_workers: int = 1,
    overwrite: bool = False, verbose: bool = True, command: str | None = None,
    storage_options: dict | None = None, summary: bool = True,
) -> dict:
    """Run the whole preparation; returns the metadata written to `diffv2_data.json`.

    `output` is a local folder or an `s3://bucket/prefix` URL (`storage_options`: keyword arguments of
    `boto3.client("s3", ...)` for LitData, e.g. `endpoint_url`; by default the AWS environment variables).
    `overwrite` replaces an earlier prepare's output, and only that: anything else there is refused.
    `verbose`: progress lines and bars (`--quiet` turns them off); `summary`: the closing summary.
    """
    start = time.perf_counter()
    target = _output_target(output, storage_options)
    sources = resolve_inputs(list(inputs))
    target.check(overwrite, sources)
    _check_split_args(val_fraction, val_tokens)
    tok = load_tokenizer(tokenizer)
    size = InputSize(tok)
    val_keys = select_validation(sources, tok, text_key, seed, val_fraction, val_tokens, verbose, size)
    target.check_space(size)

    scratch = target.begin(command)
    published = False
    try:
        for split in SPLITS:
            try:
                _write_split(split, sources, val_keys, target.split_dir(split), scratch, tokenizer, text_key,
                             chunk_bytes, chunk_size, num_workers, verbose, storage_options)
            except NoSpaceError as err:
                raise NoSpaceError(f"{err} while writing {target.name}{size.needs()}; the writer was stopped and "
                                   "nothing was written: free space there or choose another --output") from None
            except DiffV2Error:
                raise
            except RuntimeError as err:  # LitData re-raises a worker's exception with its traceback as text
                raise TokenizingFault(f"a tokenizer worker failed: {_root_cause(str(err))}; nothing was written") from err
        indexes = target.split_indexes()
        if indexes["train"] is None:  # every document empty, and nothing counted them before (no split asked)
            _require_documents(0, sources)
        _check_nothing_lost(indexes, size, sum(len(v) for v in val_keys.values()))
        meta = _metadata(indexes, tok, sources, val_keys, seed, val_fraction, val_tokens, command)
        target.publish(meta, overwrite)
        published = True
    finally:
        target.cleanup(published)
    if summary:
        _print_summary(target.name, meta, time.perf_counter() - start)
    return meta


def _root_cause(message: str) -> str:
    """The first `SomeError: ...` line of a traceback flattened into a message."""
    causes = re.findall(r"^\w+(?:Error|Exception): .*$", message, re.M)
    return causes[0] if causes else message


def _output_target(output: str | Path, storage_options: dict | None):

    if is_url(str(output)):  # checked here: anything else would become a local folder named "s3:"
        return _S3Output(str(output), storage_options)
    return _LocalOutput(output)


# ---------------------------------------------------------------- what --overwrite may replace

def replaceable_files(where: str, files: dict[str, int], marked: bool, overwrite: bool) -> list[str]:
    """The files of an existing output that `--overwrite` may delete: all of them, when they are exactly
    what an earlier prepare wrote (`marked`: its metadata or in-progress marker is there). Raises
    PrepareError otherwise, naming one file that would have been lost; never suggests --overwrite then.

    `files`: {path relative to the output: size}; sub-folders prepare never makes are entries ending in "/".
    """
    if not files:
        return []
    foreign = [name for name in files if not _PREPARE_WRITES.fullmatch(name)]
    if not marked:
        foreign = foreign or sorted(files)
    if foreign:
        example = f"{where}/{foreign[0]}"
        why = "" if marked else f" (it has no {METADATA_FILE}: `diffv2-lit prepare` did not write it)"
        if overwrite:
            raise PrepareError(f"--overwrite refused: it would delete {example}, which `diffv2-lit prepare` did not "
                               f"write{why}; --overwrite replaces only an earlier prepare's output: choose a new --output")
        raise PrepareError(f"output {where} already exists and holds files `diffv2-lit prepare` did not write "
                           f"(e.g. {example}){why}; choose a new --output")
    if not overwrite:
        what = "data prepared earlier" if METADATA_FILE in files else "an interrupted prepare's files"
        raise PrepareError(f"output {where} holds {what}; pass --overwrite to replace it (it deletes only what "
                           "prepare wrote there)")
    return sorted(files)


def _refuse_overlap(out: Path, sources: list[Source]) -> None:
    """The output may be neither an input nor a folder holding one, nor the current folder: replacing it
    would delete the user's text (or pull the folder from under the shell)."""
    for source in sources:
        path = Path(source.path)
        if out == path or out in path.parents:
            what = "is the input" if out == path else f"contains the input {path}"
            raise PrepareError(f"output {out} {what}; write the prepared data to a new folder outside the input, "
                               f"e.g. --output {out.parent / (out.name + '-prepared')}")
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise PrepareError(f"output {out} is the current folder or holds it; name a new folder, e.g. --output prepared")


def _local_files(root: Path) -> dict[str, int]:
    """{relative path: size} of everything under `root`; folders other than the splits count as entries
    ("name/"), and symbolic links are entries, never followed."""
    files: dict[str, int] = {}
    for folder, dirs, names in os.walk(root):
        base = Path(folder).relative_to(root)
        for name in dirs:
            rel = (base / name).as_posix()
            if rel not in SPLITS or (Path(folder) / name).is_symlink():
                files[rel + "/"] = 0
        dirs[:] = [d for d in dirs if (base / d).as_posix() in SPLITS and not (Path(folder) / d).is_symlink()]
        for name in names:
            path = Path(folder) / name
            files[(base / name).as_posix()] = path.lstat().st_size
    return files


def _is_prepare_metadata(read) -> bool:
    """True when the metadata file (read by `read()`) is one prepare wrote."""
    try:
        return read().get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


# ---------------------------------------------------------------- local folders and s3:// prefixes

class _LocalOutput:
    """A local folder, written as a hidden sibling and renamed into place at the end."""

    def __init__(self, output: str | Path):
        self.out = Path(output).expanduser().resolve()
        self.name = str(self.out)
        self.tmp = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"

    def check(self, overwrite: bool, sources: list[Source]) -> None:
        _refuse_overlap(self.out, sources)
        self._replaceable(overwrite)
        _remove_dead_runs(self.out)

    def check_space(self, size: InputSize) -> None:
        """Refuse before writing when the estimate of the output does not fit (LitData would hang, see writer.py)."""
        existing = next(p for p in self.out.parents if p.exists())  # the folders above may not exist yet
        free = shutil.disk_usage(existing).free
        if size.output_bytes() > free:
            raise NoSpaceError(f"not enough space for {self.out}{size.needs()}; its file system has "
                               f"{free / 2**20:.1f} MiB free: free space there or choose another --output")

    def _replaceable(self, overwrite: bool) -> list[str]:
        if not self.out.exists() and not self.out.is_symlink():
            return []
        if not self.out.is_dir():
            raise PrepareError(f"output {self.out} exists and is not a folder; choose a new --output")
        files = _local_files(self.out)
        marked = PROGRESS_FILE in files or _is_prepare_metadata(lambda: json.loads((self.out / METADATA_FILE).read_text()))
        return replaceable_files(self.name, files, marked, overwrite)

    def begin(self, command: str | None) -> Path:
        self.tmp.mkdir(parents=True)
        _write_json(self.tmp / PROGRESS_FILE, _progress_marker(command))
        return self.tmp

    def split_dir(self, split: str) -> str:
        return str(self.tmp / split)

    def split_indexes(self) -> dict[str, dict | None]:
        """{split: its index.json, or None for a split with nothing in it}."""
        files = {split: self.tmp / split / "index.json" for split in SPLITS}
        return {split: json.loads(f.read_text()) if f.is_file() else None for split, f in files.items()}

    def publish(self, meta: dict, overwrite: bool) -> None:
        """Swap the finished folder into place. What it replaces is checked again now (another run may have
        finished first, or files been added meanwhile), and only those files are deleted, after the swap."""
        _write_json(self.tmp / METADATA_FILE, meta)
        (self.tmp / PROGRESS_FILE).unlink()
        replaced = self._replaceable(overwrite)
        old = None
        if self.out.is_dir() and not replaced:
            self.out.rmdir()  # an empty folder: nothing to keep
        elif replaced:
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.out.rename(old)
        self.tmp.rename(self.out)
        if old is not None:
            _remove_files(old, replaced)

    def cleanup(self, published: bool) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # only left when something failed


def _remove_dead_runs(out: Path) -> None:
    """Remove what prepare runs that were killed left beside `out`: their hidden `.NAME.partial-<pid>-*` folders
    (marked by their PROGRESS_FILE, naming the run's pid and host) and `.NAME.old-<pid>-*` folders (the output a
    run was replacing). Folders of live runs, of other hosts, or holding anything else are left alone."""

    for folder in sorted(out.parent.glob(f".{glob.escape(out.name)}.*-*-*")):
        match = re.fullmatch(rf"\.{re.escape(out.name)}\.(partial|old)-(\d+)-[0-9a-f]{{8}}", folder.name)
        if not match or not folder.is_dir() or process_alive(int(match.group(2))):
            continue
        if match.group(1) == "partial":
            marker = folder / PROGRESS_FILE
            with contextlib.suppress(OSError, ValueError):
                started = json.loads(marker.read_text())
                if started.get("pid") == int(match.group(2)) and started.get("host") == socket.gethostname():
                    shutil.rmtree(folder, ignore_errors=True)
        else:
            with contextlib.suppress(PrepareError):
                _remove_files(folder, replaceable_files(str(folder), _local_files(folder), True, overwrite=True))
        if not folder.exists():
            print(f"[prepare] removed {folder}: left by a prepare run that was killed (pid {match.group(2)})")


def _remove_files(folder: Path, names: list[str]) -> None:
    """Delete `names` under `folder`, then the folders they leave empty; anything else stays (and is named)."""
    for name in names:
        if not name.endswith("/"):
            (folder / name).unlink(missing_ok=True)
    for split in SPLITS:
        with contextlib.suppress(FileNotFoundError, OSError):
            (folder / split).rmdir()
    try:
        folder.rmdir()
    except OSError:
        print(f"[prepare] kept {folder}: files appeared in the old output while replacing it", file=sys.stderr)


def _progress_marker(command: str | None) -> dict:
    return {"format": FORMAT_NAME, "pid": os.getpid(), "host": socket.gethostname(), "command": command,
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds")}


class _S3Output:
    """An s3://bucket/prefix: the in-progress marker first, then the chunks straight to the prefix, the metadata
    file last (the completion marker)."""

    def __init__(self, url: str, storage_options: dict | None):

        self.place = S3Prefix(url, storage_options)
        self.name = self.place.url
        self.replaced: list[str] = []
        self.scratch: Path | None = None
        if not self.place.key:
            raise PrepareError(f"output {url} is a whole bucket; write into a prefix: s3://BUCKET/NAME")

    def check_space(self, size: InputSize) -> None:
        """Object storage has no free space to check."""

    def check(self, overwrite: bool, sources: list[Source]) -> None:
        files = self.place.list()  # also the pre-flight: endpoint, credentials, bucket
        marked = PROGRESS_FILE in files or (
            METADATA_FILE in files and _is_prepare_metadata(lambda: self.place.read_json(METADATA_FILE)))
        self.replaced = replaceable_files(self.name, files, marked, overwrite)

    def begin(self, command: str | None) -> Path:
        # The marker first, so a killed run's leftovers are recognised as prepare's; then unmark the old data
        # (readers see "no prepared data" from now on) and delete exactly the files check() accepted.
        self.place.write_json(PROGRESS_FILE, _progress_marker(command))
        old = [name for name in self.replaced if name != PROGRESS_FILE]
        self.place.delete_keys(sorted(old, key=lambda name: name != METADATA_FILE))
        self.scratch = Path(tempfile.mkdtemp(prefix="diffv2-prepare-"))
        return self.scratch

    def split_dir(self, split: str) -> str:
        return self.place.child(split)

    def split_indexes(self) -> dict[str, dict | None]:
        """{split: its index.json, or None for a split with nothing in it}; one listing of the prefix."""
        present = self.place.list()
        return {split: self.place.read_json(f"{split}/index.json") if f"{split}/index.json" in present else None
                for split in SPLITS}

    def publish(self, meta: dict, overwrite: bool) -> None:
        self.place.write_json(METADATA_FILE, meta)
        self.place.delete_keys([PROGRESS_FILE])

    def cleanup(self, published: bool) -> None:
        if self.scratch is None:  # failed before writing anything
            return
        shutil.rmtree(self.scratch, ignore_errors=True)
        if not published:  # chunks of a failed run: unmarked, so no data; do not leave them to be paid for
            with contextlib.suppress(Exception):
                ours = [name for name in self.place.list() if _PREPARE_WRITES.fullmatch(name)]
                self.place.delete_keys(sorted(ours, key=lambda name: name == PROGRESS_FILE))


def _check_split_args(val_fraction: float, val_tokens: int | None) -> None:
    if val_tokens is not None and val_tokens < 0:
        raise PrepareError(f"--val-tokens must be >= 0, got {val_tokens}")
    if not 0.0 <= val_fraction < 1.0:
        raise PrepareError(f"--val-fraction must be in [0, 1), got {val_fraction}")


# ---------------------------------------------------------------- the train/validation split

def document_priority(seed: int, source_id: str, index: int) -> float:
    """A uniform number in [0, 1) per document: the seeded order in which documents go to validation."""
    digest = hashlib.blake2b(f"{seed}\0{source_id}\0{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


class InputSize:
    """What the split's pass over the input read (bytes of text, documents) and, from a sample, tokens per byte:
    about what the output will take, checked against the free space before writing (issue 24.2)."""

    SAMPLE_BYTES = 1 << 20

    def __init__(self, tok) -> None:
        self.tok, self.itemsize = tok, np.dtype(token_dtype(tok.vocab_size)).itemsize
        self.text_bytes = self.documents = self.sample_bytes = self.sample_tokens = 0

    def add(self, text: str) -> None:
        n_bytes = len(text.encode("utf-8"))
        self.text_bytes, self.documents = self.text_bytes + n_bytes, self.documents + 1
        if self.sample_bytes < self.SAMPLE_BYTES:
            self.sample_bytes += n_bytes
            self.sample_tokens += n_bytes if self.tok.name == "byte" else len(self.tok.encode_array(text))

    @property
    def tokens(self) -> int:
        """Estimated tokens with one EOS per document (exact for the byte tokenizer); 0 when nothing was read."""
        per_byte = self.sample_tokens / self.sample_bytes if self.sample_bytes else 0.0
        return round(self.text_bytes * per_byte) + self.documents

    def output_bytes(self) -> int:
        return self.tokens * self.itemsize

    def needs(self) -> str:
        if not self.documents:
            return ""
        return f" (the output needs about {self.output_bytes() / 2**20:.1f} MiB: {self.tokens:,} tokens x {self.itemsize} bytes)"


def select_validation(sources, tok, text_key, seed, val_fraction, val_tokens, verbose,
                      size: "InputSize | None" = None) -> dict[str, set[int]]:
    """Return {source_id: {document index, ...}} of the validation documents; `size` counts what was read."""
    size = size if size is not None else InputSize(tok)
    if val_tokens is not None:
        chosen = _select_by_tokens(sources, tok, text_key, seed, val_tokens, verbose, size)
    else:
        chosen = _select_by_fraction(sources, text_key, seed, val_fraction, verbose, size)
    val_keys: dict[str, set[int]] = {}
    for source_id, index in chosen:
        val_keys.setdefault(source_id, set()).add(index)
    return val_keys


def _select_by_fraction(sources, text_key, seed, fraction, verbose, size) -> list[tuple[str, int]]:
    """The `fraction` of the documents that hold text first in the seeded order. Only those are counted and
    drawn: an empty file drawn for one side would leave it with nothing (issue 24.10). Reading every document
    here also finds a bad file (not UTF-8, a truncated gzip, a non-string value) before any worker starts."""
    keys = []
    for source in _progress(sources, "read documents", verbose):
        for index, text in iter_documents(source, text_key):
            keys.append((document_priority(seed, source.source_id, index), source.source_id, index))
            size.add(text)
    _require_documents(len(keys), sources)
    if fraction <= 0 or len(keys) < 2:
        return []
    # At least one validation document and at least one training document.
    k = min(max(round(fraction * len(keys)), 1), len(keys) - 1)
    return [(sid, i) for _, sid, i in heapq.nsmallest(k, keys)]


def _check_nothing_lost(indexes: dict, size: InputSize, n_val: int) -> None:
    """Every document read before must be in the chunks: a LitData worker that dies (killed, out of memory)
    counts as finished, and the run would end with part of the data, exit 0."""
    if not size.documents:  # no pass over the input (--val-tokens 0): nothing to compare with
        return
    written = {split: split_stats(indexes[split])["documents"] for split in SPLITS}
    expected = {"train": size.documents - n_val, "val": n_val}
    if written != expected:
        raise TokenizingFault(f"a tokenizer worker failed: documents were lost while tokenizing "
                              f"({written['train']:,} train and {written['val']:,} val written, {expected['train']:,} "
                              f"and {expected['val']:,} read): a tokenizer process died (killed, or out of memory?); "
                              "run it again")


def _require_documents(n_documents: int, sources) -> None:
    if n_documents == 0:
        raise PrepareError(f"the input holds no document with text: {len(sources)} file(s), all empty or whitespace "
                           f"only (e.g. {sources[0].path}); pass files that hold text")


def _select_by_tokens(sources, tok, text_key, seed, budget, verbose, size) -> list[tuple[str, int]]:
    """The fewest lowest-priority documents that hold >= budget tokens, in one pass over the text.

    A max-heap keeps the current choice; only documents that would enter it are tokenized.
    """
    if budget <= 0:
        return []
    heap: list[tuple[float, str, int, int]] = []  # (-priority, source_id, index, tokens incl. EOS)
    total = seen = 0
    for source in _progress(sources, "choose validation documents", verbose):
        for index, text in iter_documents(source, text_key):
            seen += 1
            size.add(text)
            priority = document_priority(seed, source.source_id, index)
            if total >= budget and priority > -heap[0][0]:
                continue
            n_tokens = len(tok.encode_array(text)) + 1
            heapq.heappush(heap, (-priority, source.source_id, index, n_tokens))
            total += n_tokens
            while total - heap[0][3] >= budget:
                total -= heapq.heappop(heap)[3]
    _require_documents(seen, sources)
    if len(heap) >= seen:
        raise PrepareError(
            f"--val-tokens {budget} would take all {seen} documents ({total} tokens) for validation; "
            "lower --val-tokens or add data"
        )
    return [(sid, i) for _, sid, i, _ in heap]


# ---------------------------------------------------------------- tokenizing with litdata.optimize

@dataclass(frozen=True)
class _WorkItem:
    """One input file for one split. A dataclass (not a bare path) so LitData does not treat the
    inputs as files to copy or reorder."""

    source: Source
    val_indices: frozenset[int]


_TOKENIZERS: dict[str, object] = {}  # one tokenizer per worker process


def tokenize_item(item: _WorkItem, *, tokenizer: str, text_key: str, split: str, error_dir: str):
    """The function LitData runs in its workers: yield one token array (document + EOS) per document.

    Errors are written to `error_dir` instead of raised: a LitData worker that raises is terminated
    without its helper processes, which then linger as orphans. `prepare` raises them afterwards.
    """
    if any(Path(error_dir).iterdir()):
        return  # another file already failed: the run will be discarded, stop early
    try:
        yield from _tokenize_documents(item, tokenizer, text_key, split)
    except Exception as err:  # noqa: BLE001 - reported by prepare() in the main process
        (Path(error_dir) / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.txt").write_text(_described(err))


def _described(err: Exception) -> str:
    """Our errors' messages name the file and the fix already; anything else is named by its type."""
    return str(err) if isinstance(err, DiffV2Error) else f"{type(err).__name__}: {err}"


def _tokenize_documents(item: _WorkItem, tokenizer: str, text_key: str, split: str):
    tok = _TOKENIZERS.get(tokenizer) or _TOKENIZERS.setdefault(tokenizer, load_tokenizer(tokenizer))
    dtype = token_dtype(tok.vocab_size)
    eos = np.array([tok.eos_id], dtype=dtype)
    for index, text in iter_documents(item.source, text_key):
        if (index in item.val_indices) != (split == "val"):
            continue
        yield np.concatenate([tok.encode_array(text).astype(dtype, copy=False), eos])


def _write_split(split, sources, val_keys, output_dir: str, scratch: Path, tokenizer, text_key, chunk_bytes,
                 chunk_size, num_workers, verbose, storage_options=None) -> None:
    items = [_WorkItem(s, frozenset(val_keys.get(s.source_id, ()))) for s in sources]
    if split == "val":
        items = [it for it in items if it.val_indices]
    if not items:
        return
    if chunk_bytes is None and chunk_size is None:
        chunk_bytes = "64MB"
    if verbose:
        print(f"[prepare] tokenizing {split}: {len(items)} file(s), {min(num_workers, len(items))} worker(s)")
    error_dir = scratch / ".errors"
    error_dir.mkdir(exist_ok=True)
    fn = functools.partial(tokenize_item, tokenizer=tokenizer, text_key=text_key, split=split, error_dir=str(error_dir))
    _run_optimize(fn, items, output_dir, scratch / ".work", chunk_bytes, chunk_size,
                  max(1, min(num_workers, len(items))), verbose, storage_options)
    errors = sorted(error_dir.iterdir())
    if errors:
        raise PrepareError(f"tokenizing failed, nothing was written: {errors[0].read_text()}")
    shutil.rmtree(error_dir)


def _run_optimize(fn, items, output_dir: str, work_dir: Path, chunk_bytes, chunk_size, num_workers, verbose,
                  storage_options=None):
    from litdata import TokensLoader, optimize

    # LitData wipes its scratch folders (default /tmp/chunks, /tmp/data) at start: give each run
    # its own so concurrent runs (tests, several users) cannot delete each other's files.
    scratch = {"DATA_OPTIMIZER_CACHE_FOLDER": str(work_dir / "chunks"),
               "DATA_OPTIMIZER_DATA_CACHE_FOLDER": str(work_dir / "data")}
    # LitData's own messages (worker start/stop, an account advert, a progress bar updated only when a
    # worker ends: ~40 lines) stay hidden; our own lines say what happens. DIFFV2_LIT_DEBUG=1 shows them.
    litdata_verbose = verbose and bool(os.environ.get("DIFFV2_LIT_DEBUG"))
    with _environ(scratch), _quiet_stdout(not litdata_verbose), warnings.catch_warnings():
        # One warning per document bigger than a chunk (it only makes that chunk bigger); forked workers
        # inherit the filter.
        warnings.filterwarnings("ignore", message="An item was larger than the target chunk size")
        work_dir.mkdir(parents=True, exist_ok=True)
        # In a process group of its own under a watchdog: LitData's writer hangs on a full disk (writer.py).
        run_in_group(optimize, dict(
            fn=fn, inputs=items, output_dir=output_dir, chunk_bytes=chunk_bytes, chunk_size=chunk_size,
            num_workers=num_workers, item_loader=TokensLoader(), keep_data_ordered=True,
            # fork starts workers in milliseconds; spawn re-imports torch in each (seconds). Workers
            # only read files and tokenize, which is fork-safe. Elsewhere fork is unsafe or absent.
            start_method="fork" if sys.platform == "linux" else "spawn",
            verbose=litdata_verbose, storage_options=dict(storage_options or {}),
        ), watch_dir=work_dir)
    shutil.rmtree(work_dir, ignore_errors=True)


@contextlib.contextmanager
def _environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _quiet_stdout(quiet: bool):
    if not quiet:
        yield
        return
    with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
        yield


# ---------------------------------------------------------------- metadata and summary

def split_stats(index: dict | None) -> dict:
    """Documents, tokens, chunks and bytes of one LitData split, from its index.json (None: no split)."""
    if index is None:
        return {"documents": 0, "tokens": 0, "chunks": 0, "bytes": 0}
    chunks = index["chunks"]
    return {
        "documents": sum(c["chunk_size"] for c in chunks),  # one LitData item per document
        "tokens": sum(c["dim"] or 0 for c in chunks),
        "chunks": len(chunks),
        "bytes": sum(c["chunk_bytes"] for c in chunks),
    }


def _metadata(indexes, tok, sources, val_keys, seed, val_fraction, val_tokens, command) -> dict:
    import litdata

    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": tok.identity(),
        "eos_id": tok.eos_id,
        "dtype": np.dtype(token_dtype(tok.vocab_size)).name,
        "splits": {split: split_stats(indexes[split]) for split in SPLITS},
        "split": {"seed": seed, "val_fraction": None if val_tokens is not None else val_fraction,
                  "val_tokens": val_tokens, "val_documents": sum(len(v) for v in val_keys.values())},
        "sources": [s.source_id for s in sources],
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "litdata_version": litdata.__version__,
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def _print_summary(out: str, meta: dict, seconds: float) -> None:
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    tokens = train["tokens"] + val["tokens"]
    size = sum(s["bytes"] for s in meta["splits"].values())
    print(
        f"[prepare] wrote {out}\n"
        f"  documents: {train['documents']:,} train, {val['documents']:,} val\n"
        f"  tokens:    {train['tokens']:,} train, {val['tokens']:,} val "
        f"({tokens / max(seconds, 1e-9):,.0f} tokens/s over {seconds:.1f} s)\n"
        f"  size:      {size / 2**20:.1f} MiB in {train['chunks'] + val['chunks']} chunks; "
        f"tokenizer {meta['tokenizer']['name']} (vocab {meta['tokenizer']['vocab_size']})"
    )


def _progress(iterable, desc: str, verbose: bool):
    if not verbose:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=f"[prepare] {desc}", unit="file", leave=False)
