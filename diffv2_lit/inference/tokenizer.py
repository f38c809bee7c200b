"""Tokenizer access for inference and export: the project's tokenizers (`diffv2_lit.data.tokenizer`),
behind a spec check whose errors say what to pass instead."""

from __future__ import annotations

from pathlib import Path

from diffv2_lit.data.tokenizer import BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, ByteTokenizer, TokenizerError
from diffv2_lit.data.tokenizer import load_tokenizer as _load_project_tokenizer

# The byte tokenizer's special tokens by id, as an exported tokenizer.json must lay them out.
BYTE_SPECIAL_TOKENS = {EOS_TOKEN: ByteTokenizer.eos_id, BOS_TOKEN: ByteTokenizer.bos_id, PAD_TOKEN: ByteTokenizer.pad_id}


def load_tokenizer(spec: str):
    """Tokenizer object with encode(text) -> ids, decode(ids) -> str, vocab_size, eos_id, name."""
    _check_spec(spec)
    return _load_project_tokenizer(spec)


def _check_spec(spec: str) -> None:
    if spec == "byte":
        return
    path = Path(spec)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        raise TokenizerError(f"tokenizer {spec!r} is a folder; pass the file inside it: {path / 'tokenizer.json'}")
    if not path.is_file():
        raise TokenizerError(
            f"unknown tokenizer {spec!r}: expected 'byte' or the path to a Hugging Face tokenizer.json "
            "(for example the one `diffv2-lit train-tokenizer` wrote, or the one in an exported folder)."
        )
