"""Input files for `prepare` and `train-tokenizer`: find them, count and read their documents.

A document is: a whole `.txt` / `.txt.gz` file, one line of a `.jsonl` / `.jsonl.gz` file (the
`--text-key` field), or one row of a `.parquet` file (the `--text-key` column). Each document has a
stable key `(source_id, index)` (index = line or row number) so the train/validation split can be
decided by a seeded hash of the key, independent of worker count or file order.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffv2_lit.data.corpus import builtin_files, is_builtin

SUFFIXES = (".txt", ".txt.gz", ".jsonl", ".jsonl.gz", ".parquet")


@dataclass(frozen=True)
class Source:
    path: str  # absolute path of the file to read
    source_id: str  # stable name used in document keys and the metadata (not machine specific)

    @property
    def kind(self) -> str:
        name = self.path.lower()
        for suffix in SUFFIXES:
            if name.endswith(suffix):
                return suffix.removesuffix(".gz").lstrip(".")
        raise ValueError(f"unsupported file type: {self.path} (use {', '.join(SUFFIXES)})")


def _supported(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(SUFFIXES)


def resolve_inputs(specs: list[str]) -> list[Source]:
    """Expand folders (recursively, sorted) and `builtin:` names into a list of files."""
    sources: list[Source] = []
    for spec in specs:
        if is_builtin(spec):
            sources += [Source(str(p), f"{spec}/{p.name}") for p in builtin_files(spec)]
            continue
        path = Path(spec).expanduser().resolve()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if _supported(p))
            if not files:
                raise FileNotFoundError(f"input folder {spec} holds no {', '.join(SUFFIXES)} files")
            sources += [Source(str(p), f"{path.name}/{p.relative_to(path).as_posix()}") for p in files]
        elif path.is_file():
            Source(str(path), path.name).kind  # raises for an unsupported suffix
            sources.append(Source(str(path), path.name))
        else:
            raise FileNotFoundError(f"input {spec} does not exist")
    if len({s.source_id for s in sources}) != len(sources):
        raise ValueError("two inputs resolve to the same file name; pass each file or folder once")
    return sources


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_documents(source: Source, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """Yield `(index, text)`; empty documents are skipped (their index is simply not yielded)."""
    kind = source.kind
    if kind == "txt":
        with _open_text(source.path) as f:
            text = f.read()
        if text.strip():
            yield 0, text
    elif kind == "jsonl":
        yield from _iter_jsonl(source.path, text_key)
    else:
        yield from _iter_parquet(source.path, text_key)


def _iter_jsonl(path: str, text_key: str) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}, line {index + 1}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or text_key not in record:
                raise ValueError(f"{path}, line {index + 1}: no {text_key!r} field (set --text-key)")
            if record[text_key]:
                yield index, str(record[text_key])


def _iter_parquet(path: str, text_key: str) -> Iterator[tuple[int, str]]:
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    if text_key not in file.schema_arrow.names:
        raise ValueError(f"{path}: no column {text_key!r} (columns: {file.schema_arrow.names}; set --text-key)")
    index = 0
    for batch in file.iter_batches(columns=[text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text:
                yield index, str(text)
            index += 1


def count_documents(source: Source) -> int:
    """Upper bound on the document indices of a file, cheaply (no JSON parsing, no text decoding)."""
    kind = source.kind
    if kind == "txt":
        return 1
    if kind == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(source.path).metadata.num_rows
    opener = gzip.open if source.path.lower().endswith(".gz") else open
    with opener(source.path, "rb") as f:
        return sum(1 for _ in f)


def iter_all_documents(sources: list[Source], text_key: str = "text") -> Iterator[str]:
    for source in sources:
        for _, text in iter_documents(source, text_key):
            yield text
