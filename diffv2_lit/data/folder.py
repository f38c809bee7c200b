"""Open and check a prepared data folder before training touches it.

Every problem is found at `setup()` time and reported with what is wrong and how to fix it,
instead of surfacing later as a hang or a cryptic error inside a DataLoader worker.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from diffv2_lit.data.errors import DataError, DataSettingError  # noqa: F401 (importable from here too)
from diffv2_lit.data.layout import METADATA_FILE

PREPARE_HINT = "create it with `diffv2-lit prepare --input YOUR_TEXT --output {path}`"


@dataclass
class DataFolder:
    root: Path | str  # a local folder, or an s3:// URL
    train: Path | str
    val: Path | str | None  # None when the folder has no validation split
    meta: dict | None  # diffv2_data.json; None for a bare LitData folder written by other tools
    train_index: dict  # the splits' LitData index.json
    val_index: dict | None

    @property
    def eos_id(self) -> int | None:
        return self.meta.get("eos_id") if self.meta else None

    @property
    def is_remote(self) -> bool:
        return isinstance(self.root, str)

    def fingerprint(self) -> str:
        """What the data is: a hash of its metadata and split indexes without the parts that say when or how
        it was made (an identical re-prepare keeps it; a different one, even of the same size, does not)."""
        meta = {k: v for k, v in (self.meta or {}).items() if k not in ("created", "command", "litdata_version")}
        indexes = [{k: v for k, v in (index or {}).items() if k != "updated_at"}
                   for index in (self.train_index, self.val_index)]
        return hashlib.sha256(json.dumps([meta, indexes], sort_keys=True).encode()).hexdigest()

    def describe(self) -> str:
        """e.g. '73,186 training tokens in 39 chunks'."""
        _, tokens, _ = count_blocks(self.train_index, 1)
        return f"{tokens:,} training tokens in {len(self.train_index['chunks'])} chunks"

    def watched_files(self) -> list[Path]:
        """The files whose replacement means the folder was prepared again (local folders only)."""
        if self.is_remote:
            return []
        files = [Path(self.train) / "index.json"]
        return files + ([Path(self.root) / METADATA_FILE] if self.meta is not None else [])


def open_folder(path: str | Path) -> DataFolder:
    """A `diffv2-lit prepare` output (train/ + val/ + metadata) or a bare LitData token folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; " + PREPARE_HINT.format(path=root))
    if not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder; {_prepare_into_new_folder(root)}")
    if not any(root.iterdir()):
        raise DataError(f"data folder {root} is empty; " + PREPARE_HINT.format(path=root))
    place = LocalFolder(root)
    folder = open_prepared(place, place.list(), redo=f"re-run `diffv2-lit prepare --output {root} --overwrite` (or copy the data again)")
    if folder is None:
        raise DataError(f"{root} is not a LitData output (no {METADATA_FILE} and no index.json); "
                        + _prepare_into_new_folder(root))
    return folder


def _prepare_into_new_folder(root: Path) -> str:
    """How to prepare what `root` holds, never writing into it: `prepare --output` of a folder of text (or of a
    text file) would be refused, and --overwrite there once deleted the text (issue 24.1)."""
    from diffv2_lit.data.sources import SUFFIXES

    texts = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.name.lower().endswith(SUFFIXES))
    target = root.with_name(root.name.split(".")[0] + "-prepared")
    if texts:
        return (f"it holds text ({texts[0]}), not prepared data: prepare it into a new folder with `diffv2-lit "
                f"prepare --input {root} --output {target}` and set data.data_dir to {target}")
    return (f"prepare your text into a new folder with `diffv2-lit prepare --input YOUR_TEXT --output {target}` "
            f"and set data.data_dir to {target}")


class LocalFolder:
    """A local folder with the reading interface of `remote.S3Prefix` (url, child, list, read_json), so that
    one `open_prepared` checks local folders and s3:// prefixes alike."""

    kind, where = "folder", "on disk"

    def __init__(self, root: Path) -> None:
        self.url = root

    def child(self, *names: str) -> Path:
        return self.url.joinpath(*names)

    def list(self) -> dict[str, int]:
        """{path relative to the folder: size} of every file under it."""
        return {p.relative_to(self.url).as_posix(): p.stat().st_size for p in self.url.rglob("*") if p.is_file()}

    def read_json(self, name: str) -> dict:
        return json.loads((self.url / name).read_text())


def open_prepared(place, objects: dict[str, int], redo: str) -> DataFolder | None:
    """The DataFolder of a `prepare` output or a bare LitData token folder at `place` (a LocalFolder or an
    S3Prefix) whose files are `objects` ({relative path: size}); None when it is neither. Every chunk an
    index names must be there with the size the index records; `redo` says how to make the data again."""
    if METADATA_FILE in objects:
        meta = _read_json(place, METADATA_FILE, redo)
        train_index = check_split(place, "train", objects, redo)
        val_index = check_split(place, "val", objects, redo) if "val/index.json" in objects else None
        return DataFolder(place.url, place.child("train"), place.child("val") if val_index else None, meta,
                          train_index, val_index)
    if "index.json" in objects:
        return DataFolder(place.url, place.url, None, None, check_split(place, "", objects, redo), None)
    return None


def check_split(place, split: str, objects: dict[str, int], redo: str) -> dict:
    """Read a split's index.json (`split` "" for a bare folder) and check every chunk it names."""
    split_dir = place.child(split) if split else place.url
    key = f"{split}/" if split else ""
    if f"{key}index.json" not in objects:
        raise DataError(f"{split_dir} has no index.json: an interrupted or foreign {place.kind}; {redo}")
    index = _read_json(place, f"{key}index.json", redo)
    check_chunks(place, split, index, objects, redo)
    return index


def check_chunks(place, split: str, index: dict, objects: dict[str, int], redo: str) -> None:
    """Every chunk `index` names is in `objects` ({relative path: size}) with the size the index records."""
    split_dir = place.child(split) if split else place.url
    key = f"{split}/" if split else ""
    for chunk in check_index(index, f"{split_dir}/index.json", split_dir, place.url, redo):
        path, expected, actual = f"{split_dir}/{chunk['filename']}", chunk["chunk_bytes"], objects.get(key + chunk["filename"])
        if actual is None:
            raise DataError(f"chunk file {path} is missing (listed in index.json); {redo}")
        if actual != expected:
            raise DataError(f"chunk file {path} is corrupt or truncated: {actual} bytes {place.where}, index.json "
                            f"says {expected}; {redo}")


def _read_json(place, name: str, redo: str) -> dict:
    try:
        return place.read_json(name)
    except json.JSONDecodeError as err:
        raise DataError(f"{place.child(name)} is corrupt ({err}); {redo}") from None


def check_index(index: dict, index_file, split_dir, root, redo: str) -> list[dict]:
    """The chunks of a LitData index.json that holds token chunks; DataError otherwise."""
    try:
        chunks, loader = index["chunks"], index["config"].get("item_loader")
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{index_file} is corrupt ({err!r}); {redo}") from None
    if loader != "TokensLoader":
        raise DataError(f"{split_dir} holds LitData items written with {loader}, not token chunks "
                        "(optimize(..., item_loader=TokensLoader())); prepare it with `diffv2-lit prepare`")
    if not chunks:
        raise DataError(f"{split_dir} has no chunks; " + PREPARE_HINT.format(path=root))
    return chunks


def count_blocks(index: dict, block_size: int) -> tuple[int, int, int]:
    """(blocks of block_size tokens LitData can serve, total tokens, largest chunk in tokens) of a split's
    index.json.

    TokensLoader cuts blocks inside each chunk and drops each chunk's remainder.
    """
    chunks = index["chunks"]
    dims = [c["dim"] or 0 for c in chunks]
    return sum(d // block_size for d in dims), sum(dims), max(dims)
