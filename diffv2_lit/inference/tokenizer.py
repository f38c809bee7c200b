"""Tokenizer access for inference and export.

The project's tokenizers live in `diffv2_lit.data.tokenizer.load_tokenizer(spec)` ("byte" or a path to a
Hugging Face tokenizer.json). This module calls it when the data package is installed and otherwise falls
back to a minimal local implementation of the same two specs, so `generate` and `export` keep working in
an installation (or a branch) without the data package. Both give the same ids: the byte tokenizer is
fixed (bytes 0..255, 256 <|endoftext|>, 257 <|bos|>, 258 <|pad|>), and a tokenizer.json is a tokenizer.json.
"""

from __future__ import annotations

from pathlib import Path

BYTE_SPECIAL_TOKENS = {"<|endoftext|>": 256, "<|bos|>": 257, "<|pad|>": 258}
BYTE_VOCAB_SIZE = 259


class TokenizerError(ValueError):
    """A tokenizer spec that names nothing loadable."""


def load_tokenizer(spec: str):
    """Tokenizer object with encode(text) -> ids, decode(ids) -> str, vocab_size, eos_id, name."""
    _check_spec(spec)
    try:
        from diffv2_lit.data.tokenizer import load_tokenizer as project_load_tokenizer
    except ImportError:  # the data package is not there: same specs, local implementation
        return _ByteTokenizer() if spec == "byte" else _JsonTokenizer(spec)
    return project_load_tokenizer(spec)


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


class _ByteTokenizer:
    name = "byte"
    vocab_size = BYTE_VOCAB_SIZE
    eos_id = BYTE_SPECIAL_TOKENS["<|endoftext|>"]
    bos_id = BYTE_SPECIAL_TOKENS["<|bos|>"]
    pad_id = BYTE_SPECIAL_TOKENS["<|pad|>"]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


class _JsonTokenizer:
    def __init__(self, path: str) -> None:
        from tokenizers import Tokenizer

        self._tokenizer = Tokenizer.from_file(path)
        self.name = str(path)
        self.vocab_size = self._tokenizer.get_vocab_size()
        self.eos_id = self._tokenizer.token_to_id("<|endoftext|>")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self._tokenizer.decode([int(i) for i in ids])


def special_token_ids(tokenizer) -> dict[str, int | None]:
    """bos/eos/pad ids of a project tokenizer (None where it has none), for HF configs."""
    if getattr(tokenizer, "name", None) == "byte":
        return {"bos_token_id": BYTE_SPECIAL_TOKENS["<|bos|>"], "eos_token_id": BYTE_SPECIAL_TOKENS["<|endoftext|>"],
                "pad_token_id": BYTE_SPECIAL_TOKENS["<|pad|>"]}
    return {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": getattr(tokenizer, "eos_id", None),
            "pad_token_id": getattr(tokenizer, "pad_id", None)}
