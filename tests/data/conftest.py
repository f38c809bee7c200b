"""Shared helpers for the data tests: tiny corpora written on the fly, prepared with the real pipeline."""

import json
import random

import pytest

from diffv2_lit.data.prepare import prepare


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Distinct documents (each starts with its number) with a little non-ASCII text."""
    rng = random.Random(seed)
    words = ["thou", "art", "más", "fair", "naïve", "day", "night", "sonne", "über", "rose", "ß"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
            for i in range(n)]


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Built-in corpora are prepared into the cache: keep tests away from the user's ~/.cache.
    monkeypatch.setenv("DIFFV2_LIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus_dir(tmp_path):
    """A prepared folder of 300 short jsonl documents (~20k byte tokens) in small chunks."""
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(300))
    out = tmp_path / "prepared"
    prepare([str(src)], out, chunk_size=2048, val_fraction=0.1, num_workers=1, verbose=False)
    return out
