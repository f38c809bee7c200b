"""Open and check a prepared data folder before training touches it.

Every problem is found at `setup()` time and reported with what is wrong and how to fix it,
instead of surfacing later as a hang or a cryptic error inside a DataLoader worker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffv2_lit.data.prepare import METADATA_FILE

PREPARE_HINT = "create it with `diffv2-lit prepare --input YOUR_TEXT --output {path}`"


class DataError(ValueError):
    """A data folder or data setting that cannot work; the message says how to fix it."""


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


def open_folder(path: str | Path) -> DataFolder:
    """A `diffv2-lit prepare` output (train/ + val/ + metadata) or a bare LitData token folder."""
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist; " + PREPARE_HINT.format(path=root))
    if not root.is_dir():
        raise DataError(f"data folder {root} is a file, not a folder; " + PREPARE_HINT.format(path=root))
    if not any(root.iterdir()):
        raise DataError(f"data folder {root} is empty; " + PREPARE_HINT.format(path=root))
    if (root / METADATA_FILE).is_file():
        meta = json.loads((root / METADATA_FILE).read_text())
        train, val = root / "train", root / "val"
        train_index = check_split(train)
        if not (val / "index.json").is_file():
            return DataFolder(root, train, None, meta, train_index, None)
        return DataFolder(root, train, val, meta, train_index, json.loads((val / "index.json").read_text()))
    if (root / "index.json").is_file():
        return DataFolder(root, root, None, None, check_split(root), None)
    raise DataError(
        f"{root} is not a LitData output (no {METADATA_FILE} and no index.json); " + PREPARE_HINT.format(path=root)
    )


def check_split(split_dir: Path) -> dict:
    """Read index.json and check every chunk file exists with the size the index records."""
    index_file = split_dir / "index.json"
    if not index_file.is_file():
        raise DataError(f"{split_dir} has no index.json: an interrupted or foreign folder; re-run `diffv2-lit prepare --overwrite`")
    try:
        index = json.loads(index_file.read_text())
    except json.JSONDecodeError as err:
        raise DataError(f"{index_file} is corrupt ({err}); re-run `diffv2-lit prepare --overwrite`") from None
    chunks = check_index(index, index_file, split_dir, split_dir.parent)
    for chunk in chunks:
        _check_chunk_file(split_dir / chunk["filename"], chunk["chunk_bytes"])
    return index


def check_index(index: dict, index_file, split_dir, root) -> list[dict]:
    """The chunks of a LitData index.json that holds token chunks; DataError otherwise."""
    try:
        chunks, loader = index["chunks"], index["config"].get("item_loader")
    except (KeyError, TypeError, AttributeError) as err:
        raise DataError(f"{index_file} is corrupt ({err!r}); re-run `diffv2-lit prepare --overwrite`") from None
    if loader != "TokensLoader":
        raise DataError(f"{split_dir} holds LitData items written with {loader}, not token chunks "
                        "(optimize(..., item_loader=TokensLoader())); prepare it with `diffv2-lit prepare`")
    if not chunks:
        raise DataError(f"{split_dir} has no chunks; " + PREPARE_HINT.format(path=root))
    return chunks


def _check_chunk_file(path: Path, expected: int) -> None:
    if not path.is_file():
        raise DataError(f"chunk file {path} is missing (listed in index.json); re-run `diffv2-lit prepare --overwrite`")
    actual = path.stat().st_size
    if actual != expected:
        raise DataError(
            f"chunk file {path} is corrupt or truncated: {actual} bytes on disk, index.json says {expected}; "
            "re-run `diffv2-lit prepare --overwrite` (or copy the folder again)"
        )


def count_blocks(index: dict, block_size: int) -> tuple[int, int, int]:
    """(blocks of block_size tokens LitData can serve, total tokens, largest chunk in tokens) of a split's
    index.json.

    TokensLoader cuts blocks inside each chunk and drops each chunk's remainder.
    """
    chunks = index["chunks"]
    dims = [c["dim"] or 0 for c in chunks]
    return sum(d // block_size for d in dims), sum(dims), max(dims)
