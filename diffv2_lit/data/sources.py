"""Input files for `prepare` and `train-tokenizer`: find them and read their documents.

A document is: a whole `.txt` / `.txt.gz` file, one line of a `.jsonl` / `.jsonl.gz` file (the
`--text-key` field, a string), or one row of a `.parquet` file (the `--text-key` column, strings). Each
document has a stable key `(source_id, index)` (index = line or row number) so the train/validation split
can be decided by a seeded hash of the key, independent of worker count or file order. A document with
no text (empty, whitespace only, JSON null, a parquet null) is skipped everywhere; a value of another
type (a number, a list, ...) is refused, never turned into its Python repr.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from diffv2_lit.data.corpus import builtin_files, is_builtin
from diffv2_lit.data.errors import InputError

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
        raise InputError(f"unsupported file type: {self.path} (use {', '.join(SUFFIXES)})")


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
                raise InputError(f"input folder {spec} holds no {', '.join(SUFFIXES)} files")
            sources += [Source(str(p), f"{path.name}/{p.relative_to(path).as_posix()}") for p in files]
        elif path.is_file():
            Source(str(path), path.name).kind  # raises for an unsupported suffix
            sources.append(Source(str(path), path.name))
        else:
            raise InputError(f"input {spec} does not exist")
    if len({s.source_id for s in sources}) != len(sources):
        raise InputError("two inputs resolve to the same file name; pass each file or folder once")
    return sources


def _open_text(path: str):
    if path.lower().endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def has_text(text: str) -> bool:
    """An empty document (nothing but whitespace) is no document: it is skipped, and never counted (issue 24.10)."""
    return not text.isspace() and bool(text)


def iter_documents(source: Source, text_key: str = "text") -> Iterator[tuple[int, str]]:
    """Yield `(index, text)` of the documents that hold text; empty ones are skipped (their index is simply
    not yielded). A value that is not text is refused, naming the file, the line (row) and its type; a file
    that cannot be read (not UTF-8, a damaged gzip or parquet) is refused naming the file and the fix."""
    kind = source.kind
    with _reading(source.path):
        if kind == "txt":
            with _open_text(source.path) as f:
                text = f.read()
            if has_text(text):
                yield 0, text
        elif kind == "jsonl":
            yield from _iter_jsonl(source.path, text_key)
        else:
            yield from _iter_parquet(source.path, text_key)


@contextlib.contextmanager
def _reading(path: str):
    """Errors of the file readers (which name no file) -> one line naming the file and what to do."""
    try:
        yield
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({_encoding_guess(path)}{err.reason} at byte {err.start}); convert "
                         f"it to UTF-8, e.g. `iconv -f {_iconv_source(path)} -t UTF-8 FILE > FILE.utf8`") from None
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:  # truncated, not gzip at all, damaged
        what = "is truncated" if isinstance(err, EOFError) else "is not a valid gzip file"
        raise InputError(f"{path} {what} ({err}); copy or compress it again (`gzip -t FILE` checks one)") from None
    except Exception as err:
        if _is_arrow_error(err):
            raise InputError(f"{path} is not a readable parquet file ({_first_line(err)}); write it again, or "
                             "convert it to .jsonl") from None
        raise


def _is_arrow_error(err: Exception) -> bool:
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow comes with litdata
        return False
    return isinstance(err, (pa.ArrowException, OSError)) and not isinstance(err, FileNotFoundError) and \
        type(err).__module__.startswith("pyarrow")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


_BOMS = {b"\xff\xfe": "UTF-16", b"\xfe\xff": "UTF-16"}


def _encoding_guess(path: str) -> str:
    return "it looks like UTF-16, " if _iconv_source(path) == "UTF-16" else ""


def _iconv_source(path: str) -> str:
    """The `iconv -f` to suggest: UTF-16 when the file starts with its byte order mark, else a common guess."""
    try:
        opener = gzip.open if path.lower().endswith(".gz") else open
        with opener(path, "rb") as f:
            return _BOMS.get(f.read(2), "LATIN1")
    except (OSError, EOFError):
        return "LATIN1"


# JSON's own names of the types json.loads returns (bool before int: True is an int in Python).
_JSON_TYPES = ((bool, "boolean"), (int, "number"), (float, "number"), (list, "array"), (dict, "object"))


def _iter_jsonl(path: str, text_key: str) -> Iterator[tuple[int, str]]:
    with _open_text(path) as f:
        for index, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise InputError(f"{path}, line {index + 1}: not valid JSON ({err})") from None
            if not isinstance(record, dict) or text_key not in record:
                raise InputError(f"{path}, line {index + 1}: no {text_key!r} field (set --text-key)")
            text = record[text_key]
            if text is None:  # a missing value: an empty document
                continue
            if not isinstance(text, str):  # str() would train on its Python repr (issue 24.8)
                kind = next(name for type_, name in _JSON_TYPES if isinstance(text, type_))
                raise InputError(f"{path}, line {index + 1}: {text_key!r} is a JSON {kind} ({_clip(line)}), not a "
                                 f"string; write the text as a string, or set --text-key to the field holding it")
            if has_text(text):
                yield index, text


def _clip(line: str, width: int = 40) -> str:
    line = line.strip()
    return line if len(line) <= width else line[: width - 3] + "..."


def _iter_parquet(path: str, text_key: str) -> Iterator[tuple[int, str]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = pq.ParquetFile(path)
    schema = file.schema_arrow
    if text_key not in schema.names:
        raise InputError(f"{path}: no column {text_key!r} (columns: {schema.names}; set --text-key)")
    column_type = schema.field(text_key).type
    value_type = column_type.value_type if pa.types.is_dictionary(column_type) else column_type
    if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)):
        raise InputError(f"{path}: column {text_key!r} holds {column_type} values, not strings; write the text as a "
                         "string column, or set --text-key to the column holding it")
    index = 0
    for batch in file.iter_batches(columns=[text_key], batch_size=4096):
        for text in batch.column(0).to_pylist():
            if text is not None and has_text(text):  # null: a missing value, an empty document
                yield index, text
            index += 1


def iter_all_documents(sources: list[Source], text_key: str = "text") -> Iterator[str]:
    for source in sources:
        for _, text in iter_documents(source, text_key):
            yield text
