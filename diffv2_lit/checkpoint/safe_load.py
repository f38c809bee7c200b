"""Reading checkpoints without running code from them: the one loader, its allow-list, and the opt-in.

A checkpoint is a pickle, and unpickling calls whatever functions the file names: a `.ckpt` someone
shared can run `os.system(...)` the moment it is loaded. Everything diffv2-lit and Lightning 2.6 write
is data (tensors, numbers, strings, lists, tuples, dicts, None), so every read of a checkpoint goes
through this module and refuses anything else:

- `load_file`: `torch.load(weights_only=True)` plus `CHECKPOINT_GLOBALS` (a Lightning `.ckpt`, a
  sharded folder's `meta.pt`, one non-tensor item of a sharded checkpoint);
- `load_sharded`: torch.distributed.checkpoint folders. torch reads their `.metadata` with plain
  `pickle.load` and their non-tensor items (optimizer hyper-parameters) with
  `torch.load(weights_only=False)`; here torch's public reader and planner, each with one method
  replaced (`_dcp_safe_classes`), unpickle `.metadata` with `dcp_metadata_globals()` only and the items
  with `load_file`;
- `verify`: every pickled part of a checkpoint, loaded and dropped (a check before handing the
  checkpoint to code that reads it its own way);
- `guard_restore`: Lightning's own restore inside `fit` / `validate`, after `verify` (see there).

A checkpoint that needs anything more is refused with `UntrustedCheckpointError`, one line naming the
type. Whoever trusts the file's source opts in with `DIFFV2_LIT_TRUST_CHECKPOINTS=1` (the tools also
take `--trust-checkpoint`, Python code `with trusting(): ...`): the restricted load is still tried
first, and only a file that needs more is then loaded with full pickle, with a warning naming what
was trusted. docs/faults.md, "Untrusted checkpoints".

Self-contained on purpose (torch only): it can move as one file.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import io
import os
import pathlib
import pickle
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from diffv2_lit.checkpoint.errors import CheckpointError
from diffv2_lit.checkpoint.layout import (DCP_METADATA, LIGHTNING_META, checkpoint_problem, sibling_checkpoints,
                                         unreadable_message)

TRUST_ENV = "DIFFV2_LIT_TRUST_CHECKPOINTS"
TRUE_VALUES = ("1", "true", "yes", "on")

# Globals a diffv2-lit checkpoint may name beyond torch's own weights_only set (tensors, storages,
# dtypes, torch.Size, torch.device, OrderedDict; dict/list/tuple/str/int/float/bool/None need none).
# Empty, checked on every checkpoint the project writes (fp32, FSDP2 `meta.pt`, preemption,
# spike-stop; tests/faults/test_untrusted_checkpoints.py): hyper-parameters are plain dicts
# (DecoderLM stores its Architecture / ModelConfig with dataclasses.asdict, paths as str), the LR
# schedule saves `lr_lambdas` as the partial's empty __dict__, callbacks and LitData save numbers,
# strings and lists. Add a type only if it is genuinely data, and say why next to it.
CHECKPOINT_GLOBALS: tuple = ()

_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("diffv2_lit_trust_checkpoints", default=False)


class UntrustedCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint that needs more than data to load; the message names the type and the opt-in."""

    def __init__(self, source, offending: list[str]) -> None:
        self.source, self.offending = str(source), list(offending)
        super().__init__(refusal_message(self.source, self.offending))


class DamagedCheckpointError(CheckpointError):
    """A checkpoint that is there but cannot be read (random bytes, a cut-off or missing part): a runtime fault,
    exit 1 in every tool (docs/faults.md). The message names the damaged file and what to do."""


def damaged_message(what, path, reason: str, part: str = "") -> str:
    """One line: which part of which checkpoint is damaged, why it cannot be read, what complete.json says
    about the folder (unless it names the same missing `part`), and what to use instead."""
    checkpoint = Path(path).parent if Path(path).name in (DCP_METADATA, LIGHTNING_META) else Path(path)
    message = f"{what} is damaged: {reason}"
    problem = checkpoint_problem(checkpoint) if checkpoint.is_dir() else None
    if problem and not (part and problem.startswith(part)):
        message += f"; {problem}"
    others = [p for p in sibling_checkpoints(checkpoint) if os.path.abspath(p) != os.path.abspath(checkpoint)]
    message += "; copy the checkpoint again from where it was saved, or use another one"
    return message + (f", e.g. {others[0]} (the newest complete one next to it)." if others else ".")


def error_reason(error: BaseException) -> str:
    """'UnicodeDecodeError: ...': the first line of an exception, for a one-line message."""
    text = str(error).strip()
    if _WEIGHTS_ONLY_DETAIL in text:  # torch's weights-only advice first, the actual reason further down
        text = text.split(_WEIGHTS_ONLY_DETAIL, 1)[1].strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


_WEIGHTS_ONLY_DETAIL = "WeightsUnpickler error:"


def refusal_message(source: str, offending: list[str]) -> str:
    names = ", ".join(offending)
    return (f"refusing to load {source}: it holds a pickled {names}, which is not data a diffv2-lit checkpoint "
            "is made of (tensors, numbers, strings, lists, dicts), and unpickling it could run code. If you trust "
            f"the source of this checkpoint, rerun with {TRUST_ENV}=1 (generate, export and consolidate also "
            "take --trust-checkpoint).")


# ---- the opt-in --------------------------------------------------------------------------------


def checkpoints_trusted() -> bool:
    return _trusted.get() or os.environ.get(TRUST_ENV, "").strip().lower() in TRUE_VALUES


@contextlib.contextmanager
def trusting(enabled: bool = True) -> Iterator[None]:
    """Within the block, a checkpoint that needs more than data loads with full pickle (after a warning)."""
    token = _trusted.set(enabled or _trusted.get())
    try:
        yield
    finally:
        _trusted.reset(token)


def _warn_trusted(source, offending: list[str]) -> None:
    warnings.warn(f"trusting {source} ({TRUST_ENV} / --trust-checkpoint): loading it with full pickle for "
                  f"{', '.join(offending)}", UserWarning, stacklevel=3)


# ---- single files (torch.save) -------------------------------------------------------------------


def load_file(file, *, map_location: Any = "cpu", mmap: bool = False, source=None) -> Any:
    """`torch.load(file, weights_only=True)` with `CHECKPOINT_GLOBALS`; `file` is a path or a seekable
    binary file. Raises UntrustedCheckpointError for anything that needs more (unless trusted); a
    damaged file raises torch's own error."""
    source = source if source is not None else file
    try:
        with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            return torch.load(_rewound(file), map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        offending = offending_globals(file, error)
        if not offending:
            raise  # not a refused type: a damaged or foreign file, reported by the caller as such
        if not checkpoints_trusted():
            raise UntrustedCheckpointError(source, offending) from None
        _warn_trusted(source, offending)
        return torch.load(_rewound(file), map_location=map_location, weights_only=False, mmap=mmap)


def _rewound(file):
    if hasattr(file, "seek"):
        file.seek(0)
    return file


def offending_globals(file, error: BaseException) -> list[str]:
    """The globals a refused torch.save file names that are not allowed, e.g. ['posix.system']."""
    allowed = {_global_name(obj) for obj in CHECKPOINT_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(_rewound(file))
        names = [name for name in found if name not in allowed]
    except Exception:  # noqa: BLE001 - not a zip archive: fall back to torch's message
        names = []
    return names or _globals_in_message(str(error))


def _globals_in_message(message: str) -> list[str]:
    """torch's weights-only errors: 'GLOBAL posix.system whose module posix is blocked', 'GLOBAL exec was
    not an allowed global', 'unrecognized function <built-in function exec>', '... but got <class 'x.Y'>'."""
    for pattern in (r"GLOBAL (\S+)", r"unrecognized function <\S+ \S+ (\w+)>", r"but got <class '([^']+)'>"):
        match = re.search(pattern, message)
        if match:
            return [match.group(1)]
    return []


def _global_name(obj) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


# ---- sharded folders (torch.distributed.checkpoint) -------------------------------------------------


def dcp_metadata_globals() -> dict[str, Any]:
    """What torch.distributed.checkpoint's `.metadata` pickle may name: its own index dataclasses,
    torch.Size / dtypes / layouts, and pathlib.PosixPath (`StorageMeta.checkpoint_id`, the folder
    Lightning saved to, which it passes as a Path). All of them are built from plain values only."""
    from torch.distributed.checkpoint import filesystem, metadata

    types = [metadata.Metadata, metadata.MetadataIndex, metadata.StorageMeta, metadata.TensorStorageMetadata,
             metadata.BytesStorageMetadata, metadata.ChunkStorageMetadata, metadata.TensorProperties,
             metadata._MEM_FORMAT_ENCODING, filesystem._StorageInfo, torch.Size, pathlib.PosixPath]
    allowed = {_global_name(t): t for t in types}
    allowed["torch.serialization._get_layout"] = torch.serialization._get_layout
    allowed.update({str(t): t for t in vars(torch).values() if isinstance(t, torch.dtype)})
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """pickle with an allow-list of globals (the Python docs' "Restricting Globals")."""

    def __init__(self, file, allowed: dict[str, Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[f"{module}.{name}"]
        except KeyError:
            raise pickle.UnpicklingError(f"GLOBAL {module}.{name} is not allowed") from None


def read_dcp_metadata(path) -> Any:
    """A sharded checkpoint's `.metadata` (torch's `Metadata` index), unpickled with the allow-list. Damaged
    bytes raise DamagedCheckpointError naming the file (pickle itself fails on random bytes with any of
    UnpicklingError, UnicodeDecodeError, EOFError, ValueError, ... or returns something else than an index)."""
    from torch.distributed.checkpoint.metadata import Metadata

    with open(path, "rb") as file:
        try:
            metadata = _RestrictedUnpickler(file, dcp_metadata_globals()).load()
        except pickle.UnpicklingError as error:
            offending = [name for name in _globals_in_message(str(error)) if _PYTHON_NAME.fullmatch(name)]
            if not offending:  # not a refused type (or garbage bytes that happen to spell a GLOBAL opcode)
                raise DamagedCheckpointError(_damaged_index(path, error)) from error
            if not checkpoints_trusted():
                raise UntrustedCheckpointError(path, offending) from None
            _warn_trusted(path, offending)
            file.seek(0)
            metadata = pickle.load(file)
        except Exception as error:  # noqa: BLE001 - whatever random bytes make pickle raise
            raise DamagedCheckpointError(_damaged_index(path, error)) from error
    if not isinstance(metadata, Metadata):
        raise DamagedCheckpointError(_damaged_index(path, f"it holds a {type(metadata).__name__}, not an index"))
    return metadata


_PYTHON_NAME = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+")  # module.name, as a real pickle names a global


def _damaged_index(path, error) -> str:
    reason = error if isinstance(error, str) else f"it cannot be read as the index of the shards ({error_reason(error)})"
    return damaged_message(f"{path} (the sharded checkpoint's index, torch.distributed.checkpoint's {DCP_METADATA})",
                           path, reason)


@functools.lru_cache(maxsize=None)
def _dcp_safe_classes():
    """(SafeFileSystemReader, SafeLoadPlanner), built on first use: importing torch.distributed.checkpoint
    costs about a second, which loading a single file need not pay. Both are torch's public reader and
    planner with one method each replaced."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeFileSystemReader(FileSystemReader):
        """`.metadata` read with the allow-list, once, when constructed: inside a load, torch catches a
        failing `read_metadata`, logs its traceback and retries with rank-local metadata, which would
        bury the refusal."""

        def __init__(self, folder) -> None:
            super().__init__(folder)
            self.safe_metadata = read_dcp_metadata(Path(folder) / DCP_METADATA)

        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # rank-local metadata: Lightning's saves never write it
                raise FileNotFoundError(f"{self.path} has no rank-local metadata")
            metadata = self.safe_metadata
            if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata does
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafeLoadPlanner(DefaultLoadPlanner):
        """Fills a flat {fqn: value} dict (no flattening: the keys already are the saved ones); non-tensor
        items through `load_file`, where DefaultLoadPlanner uses torch.load(weights_only=False)."""

        def __init__(self, source: str) -> None:
            super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)  # fill the dict given
            self.source = source

        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            self.state_dict[fqn] = load_file(value, source=f"{self.source} (item {fqn})")

    return SafeFileSystemReader, SafeLoadPlanner


def load_complete(path, target=None, **load_kwargs) -> Any:
    """`load_file(target or path)` once `path` is a complete checkpoint (`target`: a file inside a sharded
    folder, e.g. its meta.pt). An incomplete or damaged one is one CheckpointError naming `path` and the
    checkpoint to use instead; a refused type stays an UntrustedCheckpointError."""
    problem = checkpoint_problem(path)
    if problem:
        raise CheckpointError(unreadable_message(path, problem))
    try:
        return load_file(target or path, **load_kwargs)
    except (CheckpointError, FileNotFoundError):
        raise
    except Exception as err:  # a damaged archive: torch.load's own error is a zip/pickle traceback
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(unreadable_message(path, f"torch.load failed: {message}")) from err


def load_meta_pt(folder) -> dict:
    """A sharded folder's `meta.pt` (Lightning's hyper-parameters and loop state), as data; missing or
    damaged is a DamagedCheckpointError naming it."""
    path = Path(folder) / LIGHTNING_META
    what = f"{path} (Lightning's hyper-parameters and loop state, written beside the shards)"
    if not path.is_file():
        raise DamagedCheckpointError(damaged_message(f"sharded checkpoint {folder}", folder, f"{what} is missing",
                                                     part=LIGHTNING_META))
    try:
        meta = load_file(path)
    except CheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - torch.load's zip / pickle errors on damaged bytes
        raise DamagedCheckpointError(damaged_message(what, path, f"it cannot be read ({error_reason(error)})")) from error
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(damaged_message(what, path, f"it holds a {type(meta).__name__}, not a dict"))
    return meta


def missing_index_error(folder) -> DamagedCheckpointError:
    """A folder with shards or a meta.pt but no `.metadata`: a sharded checkpoint that lost its index."""
    return DamagedCheckpointError(damaged_message(
        f"sharded checkpoint {folder}", folder,
        f"its {DCP_METADATA} (the index of its shards, written after them) is missing", part=DCP_METADATA))


def looks_sharded(path) -> bool:
    """A folder with the parts of a sharded checkpoint (shards or meta.pt), whether or not its index is there."""
    path = Path(path)
    return path.is_dir() and ((path / DCP_METADATA).exists() or (path / LIGHTNING_META).exists()
                              or any(path.glob("*.distcp")))


def load_sharded(path, keys: set[str] | None = None) -> dict[str, Any]:
    """The state dict of a sharded checkpoint folder (only `keys`, e.g. {"state_dict"}, if given), read in
    this process alone, with the allow-lists. torch's own `dcp_to_torch_save` unpickles everything."""
    from torch.distributed.checkpoint import load

    reader_class, planner_class = _dcp_safe_classes()
    reader = reader_class(path)
    metadata = reader.safe_metadata
    paths = metadata.planner_data or {}  # fqn -> its path in the saved (nested) state dict
    flat = {fqn: _empty_like_saved(item) for fqn, item in metadata.state_dict_metadata.items()
            if keys is None or _selected(fqn, paths.get(fqn, (fqn,)), keys)}
    with _refusals_unwrapped(path), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # no_dist=True is the intent
        load(flat, storage_reader=reader, planner=planner_class(str(path)), no_dist=True)
    state: dict[str, Any] = {}
    for fqn, value in flat.items():
        _set_at_path(state, paths.get(fqn, (fqn,)), value)
    return state


def _empty_like_saved(item):
    """What DCP reads a saved item into: an empty tensor of the saved shape, or None for a pickled value."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return torch.empty(item.size, dtype=item.properties.dtype) if isinstance(item, TensorStorageMetadata) else None


def _selected(fqn: str, path: tuple, keys: set[str]) -> bool:
    """`fqn` itself or one of its parents (`state_dict`, `state_dict.model`, ...) is asked for."""
    parents = (".".join(str(part) for part in path[:depth]) for depth in range(1, len(path) + 1))
    return fqn in keys or any(parent in keys for parent in parents)


def _set_at_path(root: dict, path: tuple, value) -> None:
    """root[path[0]][path[1]]... = value, creating dicts (str keys) and lists (int keys) on the way, as DCP's
    flattening took them apart (`planner_data` holds each item's path)."""
    container = root
    for key, next_key in zip(path, path[1:]):
        empty = [] if isinstance(next_key, int) else {}
        if isinstance(container, list):
            container.extend([None] * (key + 1 - len(container)))
            if container[key] is None:
                container[key] = empty
        else:
            container.setdefault(key, empty)
        container = container[key]
    last = path[-1]
    if isinstance(container, list):
        container.extend([None] * (last + 1 - len(container)))
    container[last] = value


@contextlib.contextmanager
def _refusals_unwrapped(path) -> Iterator[None]:
    """torch.distributed.checkpoint wraps every error of a load step in a CheckpointException (a
    BaseException listing each rank's traceback); surface a refusal as itself, anything else as one
    DamagedCheckpointError naming the folder."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        yield
    except CheckpointException as wrapped:
        errors = [error for error, _ in wrapped.failures.values()]
        for error in errors:
            if isinstance(error, CheckpointError):
                raise error from None
        # A shard torch could not read: random bytes in a tensor's torch.save record, a cut-off file.
        shards = sorted(p.name for p in Path(path).glob("*.distcp"))
        which = f"its shard {shards[0]}" if len(shards) == 1 else f"one of its {len(shards)} shards (*.distcp)"
        raise DamagedCheckpointError(damaged_message(
            f"sharded checkpoint {path}", path,
            f"{which} cannot be read ({error_reason(errors[0]) if errors else wrapped})")) from None


def verify(path) -> None:
    """Load every non-tensor part of a checkpoint (a file, or a sharded folder's `meta.pt`, `.metadata`
    and non-tensor items) with the allow-lists, raising UntrustedCheckpointError if one needs more."""
    path = Path(path)
    if not path.is_dir():
        load_file(path, mmap=True)
        return
    if (path / LIGHTNING_META).is_file():
        load_file(path / LIGHTNING_META)
    if (path / DCP_METADATA).is_file():
        from torch.distributed.checkpoint.metadata import BytesStorageMetadata

        items = read_dcp_metadata(path / DCP_METADATA).state_dict_metadata
        non_tensor = {key for key, item in items.items() if isinstance(item, BytesStorageMetadata)}
        if non_tensor:
            load_sharded(path, keys=non_tensor)


# ---- Lightning's restore inside fit / validate ------------------------------------------------------


def guard_restore(strategy) -> None:
    """Make `strategy.load_checkpoint` (what the Trainer calls to restore `ckpt_path`) read only data.

    Every pickled part of the checkpoint is `verify`-ed with the allow-lists first; then Lightning restores
    it its own way (with `weights_only=True`), reading only what was just checked. That covers the reads
    Lightning does not route through a CheckpointIO: `ModelParallelStrategy` (FSDP2) loads `meta.pt` with
    fit's `weights_only` and the shards through torch's default DCP reader (plain `pickle.load` of
    `.metadata`, `torch.load(weights_only=False)` of each non-tensor item); `FSDPStrategy` (FSDP1) with a
    lazy pickle loader of its own. With the opt-in, a refused checkpoint is restored with
    `weights_only=False` after a warning.
    """
    strategy.load_checkpoint = _GuardedRestore(strategy)


class _GuardedRestore:
    """What `guard_restore` puts in place of `strategy.load_checkpoint`: a class, not a closure, so a
    strategy that is pickled for its worker processes (ddp_spawn) still pickles."""

    def __init__(self, strategy) -> None:
        self.strategy = strategy

    def __call__(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            if os.path.exists(checkpoint_path):  # else Lightning's own read says what is missing
                verify(checkpoint_path)
        except UntrustedCheckpointError as refused:
            if not checkpoints_trusted():
                raise
            _warn_trusted(checkpoint_path, refused.offending)
            return self._restore(checkpoint_path, weights_only=False)
        except CheckpointError:
            raise
        except Exception:  # noqa: BLE001 - a damaged file: the read below (AtomicCheckpointIO) names the part
            pass
        return self._restore(checkpoint_path, weights_only=True)

    def _restore(self, checkpoint_path, weights_only: bool) -> dict[str, Any]:
        # The class's method, not a bound one kept from before: that would pickle as getattr(strategy, ...).
        with torch.serialization.safe_globals(list(CHECKPOINT_GLOBALS)):
            return type(self.strategy).load_checkpoint(self.strategy, checkpoint_path, weights_only=weights_only)
