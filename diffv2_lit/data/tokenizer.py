"""Tokenizers: a built-in byte tokenizer and Hugging Face `tokenizers` JSON files (all offline).

`load_tokenizer("byte")` needs no files: ids 0..255 are the UTF-8 bytes, then three special
tokens. `load_tokenizer("path/to/tokenizer.json")` wraps any `tokenizers` file (the format most
open models ship). Both expose the same small interface, and `identity()` whose `hash` is what a
prepared data folder records, so training can refuse data made with a different tokenizer.

`train_bpe` is what `diffv2-lit train-tokenizer` (cli/train_tokenizer.py) runs: a byte-level BPE trained on the
user's files.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from diffv2_lit.errors import EXIT_USAGE, DiffV2Error

EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|bos|>"
PAD_TOKEN = "<|pad|>"
# The byte tokenizer's special tokens by id, as an exported tokenizer.json lays them out (ByteTokenizer's ids).
BYTE_SPECIAL_TOKENS = {EOS_TOKEN: 256, BOS_TOKEN: 257, PAD_TOKEN: 258}
# Names other tokenizer files use for "end of document", tried in this order.
EOS_CANDIDATES = (EOS_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "<|eot_id|>")


class TokenizerError(DiffV2Error, ValueError):
    """A tokenizer that cannot be loaded or trained; the message names the file and what to pass instead."""

    exit_code = EXIT_USAGE


class ByteTokenizer:
    """UTF-8 bytes (0..255) + <|endoftext|> (256, EOS) + <|bos|> (257) + <|pad|> (258)."""

    name = "byte"
    vocab_size = 259
    eos_id = BYTE_SPECIAL_TOKENS[EOS_TOKEN]
    bos_id = BYTE_SPECIAL_TOKENS[BOS_TOKEN]
    pad_id = BYTE_SPECIAL_TOKENS[PAD_TOKEN]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        """Fast path for `prepare`: no Python list of ints in between."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
        specials = {self.eos_id: EOS_TOKEN, self.bos_id: BOS_TOKEN, self.pad_id: PAD_TOKEN}
        parts, run = [], bytearray()
        for i in ids:
            if i < 256:
                run.append(i)
                continue
            parts += [run.decode("utf-8", errors="replace"), specials.get(i, "")]
            run = bytearray()
        return "".join(parts) + run.decode("utf-8", errors="replace")

    def identity(self) -> dict:
        # The byte tokenizer has no files: hash a canonical description of its id layout instead.
        layout = f"byte-v1 eos={self.eos_id} bos={self.bos_id} pad={self.pad_id} vocab={self.vocab_size}"
        return {"name": self.name, "vocab_size": self.vocab_size, "hash": _sha256(layout.encode())}


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON file; EOS is the first of EOS_CANDIDATES it defines."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer

        self.path = Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception for a damaged or foreign file
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise TokenizerError(f"tokenizer {self.path} is not a valid Hugging Face tokenizer.json ({reason}); pass "
                                 "'byte' or an intact tokenizer.json (e.g. one written by `diffv2-lit "
                                 "train-tokenizer`)") from None
        self.name = str(self.path)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = self._find_eos()
        self.pad_id = self._tok.token_to_id(PAD_TOKEN)
        self._hash = _sha256(self.path.read_bytes())

    def _find_eos(self) -> int:
        for token in EOS_CANDIDATES:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise TokenizerError(
            f"tokenizer {self.path} defines no end-of-document token (looked for {', '.join(EOS_CANDIDATES)}); "
            f"add {EOS_TOKEN!r} as a special token or train one with `diffv2-lit train-tokenizer`"
        )

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_array(self, text: str) -> np.ndarray:
        dtype = np.uint16 if self.vocab_size <= 65536 else np.uint32
        return np.asarray(self.encode(text), dtype=dtype)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def identity(self) -> dict:
        return {"name": self.path.name, "vocab_size": self.vocab_size, "hash": self._hash}


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """`"byte"` or the path of a `tokenizer.json` (a folder holding one works too: an export folder, the folder
    `train-tokenizer` wrote into). The one loader: data, training, generate and export all use it."""
    if str(spec) == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer {spec!r} not found: pass 'byte' or the path of a Hugging Face tokenizer.json "
            "(e.g. one written by `diffv2-lit train-tokenizer`)"
        )
    return HFTokenizer(path)


def token_dtype(vocab_size: int) -> type:
    """Smallest unsigned dtype holding every id (halves the data size for vocabularies <= 65536)."""
    return np.uint16 if vocab_size <= 65536 else np.uint32


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------- diffv2-lit train-tokenizer

def train_bpe(documents, vocab_size: int, min_frequency: int = 2, show_progress: bool = True):
    """A GPT-2 style byte-level BPE: never produces unknown tokens; EOS and PAD are special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 256 + 2:
        raise TokenizerError(f"--vocab-size {vocab_size} is too small: byte-level BPE needs at least 258 (256 bytes + 2 specials)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, show_progress=show_progress,
        special_tokens=[EOS_TOKEN, PAD_TOKEN], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok
