"""Built-in corpora shipped inside the package, addressed as `builtin:<name>`.

The quickstart must run on a fresh machine with no download, so a compact public-domain corpus
lives in `diffv2_lit/corpus/` (installed as package data). `build_shakespeare` is the script that
made it, kept here so the selection can be reproduced and audited.
"""

from __future__ import annotations

import gzip
import re
from pathlib import Path

from diffv2_lit.data.errors import InputError

BUILTIN_PREFIX = "builtin:"
CORPUS_DIR = Path(__file__).resolve().parent.parent / "corpus"

# name -> glob inside CORPUS_DIR; each matching file is one document.
BUILTIN_CORPORA: dict[str, str] = {"shakespeare": "shakespeare/*.txt.gz"}

# Plays left out of the shipped selection to keep the package under ~1.5 MB compressed.
SHAKESPEARE_EXCLUDED = (
    "henry_vi_part_1", "henry_vi_part_2", "henry_vi_part_3", "henry_viii", "john", "timon_of_athens",
    "tragedy_of_titus_andronicus", "pericles", "troilus_and_cressida", "merry_wives_of_windsor",
    "two_gentlemen_of_verona",
)


def is_builtin(spec: str) -> bool:
    return str(spec).startswith(BUILTIN_PREFIX)


def builtin_name(spec: str) -> str:
    name = str(spec)[len(BUILTIN_PREFIX):]
    if name not in BUILTIN_CORPORA:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_CORPORA)
        raise InputError(f"unknown built-in corpus {spec!r}; known: {known}")
    return name


def builtin_files(spec: str) -> list[Path]:
    """The files of a built-in corpus, sorted so document order never depends on the filesystem."""
    files = sorted(CORPUS_DIR.glob(BUILTIN_CORPORA[builtin_name(spec)]))
    if not files:
        raise FileNotFoundError(
            f"built-in corpus {spec!r} has no files under {CORPUS_DIR}; the package was installed "
            "without its package data (reinstall diffv2-lit)"
        )
    return files


_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)


def strip_gutenberg(text: str) -> str:
    """Keep only the work itself: drop the Project Gutenberg header and licence footer if present."""
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text.strip() + "\n"


def build_shakespeare(source_dir: str | Path, target_dir: str | Path | None = None) -> list[Path]:
    """Rebuild `corpus/shakespeare/` from the `*_gut.txt` files (one gzip per play, no timestamps)."""
    target = Path(target_dir) if target_dir else CORPUS_DIR / "shakespeare"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(Path(source_dir).glob("*_gut.txt")):
        name = path.name.removesuffix("_gut.txt")
        if name in SHAKESPEARE_EXCLUDED:
            continue
        text = strip_gutenberg(path.read_text(encoding="utf-8"))
        out = target / f"{name}.txt.gz"
        with open(out, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
            gz.write(text.encode("utf-8"))
        written.append(out)
    return written
