"""Sample text from a checkpoint or an exported folder, with the KV cache (`diffv2-lit generate`, its flags in
cli/generate.py): `run(args)` takes the parsed flags and raises `GenerateError` for a request it cannot serve.

PATH is a Lightning .ckpt file, a sharded (FSDP2) checkpoint directory or a `diffv2-lit export` folder.
One prompt streams its continuation to the terminal token by token. Several prompts (repeated --prompt,
or one per non-empty line of --prompt-file) are decoded in batches of prompts with the same token
count (the model has no padding mask, so batching equal lengths keeps every result exact); each
continuation is printed when its batch finishes. Generation stops at max-new-tokens or, per prompt, at
the tokenizer's end-of-text token (a batch stops decoding within 32 tokens of its last prompt's end). On CUDA the default dtype is bfloat16, on CPU float32.

A request longer than the model's context is refused. One longer than the sequences the model was
trained on (when the checkpoint records it) is served with a warning: past that length the model has
never been trained, and its text usually degrades.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch

from diffv2_lit.checkpoint.reading import load_for_inference, recorded_tokenizer_sha256
from diffv2_lit.data.tokenizer import load_tokenizer
from diffv2_lit.errors import EXIT_USAGE, DiffV2Error
from diffv2_lit.inference.decoding import shared_decoder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GenerateError(DiffV2Error, ValueError):
    """A request that cannot be served (prompt too long, tokenizer does not fit the model, ...)."""

    exit_code = EXIT_USAGE


def run(args: argparse.Namespace) -> None:
    _check_sampling_args(args)
    device = _resolve_device(args.device)
    dtype = DTYPES.get(args.dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, config, stored_spec, train_seq_len = load_for_inference(args.ckpt, device=device, dtype=dtype)
    tokenizer = _tokenizer(args.tokenizer or stored_spec, config.vocab_size)
    _check_tokenizer_identity(tokenizer, args.tokenizer or stored_spec, stored_spec, recorded_tokenizer_sha256(args.ckpt))
    prompts = _read_prompts(args)
    encoded = [_encode(tokenizer, text, config.max_seq_len, args.max_new_tokens) for text in prompts]
    _warn_past_training_length(max(len(ids) for ids in encoded), args.max_new_tokens, train_seq_len)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    eos_id = None if args.ignore_eos else tokenizer.eos_id
    started, n_tokens = time.perf_counter(), 0
    for indices in _equal_length_groups(encoded):
        n_tokens += _generate_group(model, tokenizer, prompts, encoded, indices, args, generator, eos_id)
    elapsed = time.perf_counter() - started
    print(f"\n[{n_tokens} new tokens in {elapsed:.1f} s, {n_tokens / max(elapsed, 1e-9):.1f} tokens/s, "
          f"{config.attention}, {device.type}, {str(dtype).removeprefix('torch.')}]", file=sys.stderr)


# ---- arguments ------------------------------------------------------------------------------------


def _check_sampling_args(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise GenerateError(f"--max-new-tokens={args.max_new_tokens} must be at least 1.")
    if args.top_k is not None and args.top_k < 1:
        raise GenerateError(f"--top-k={args.top_k} must be at least 1.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise GenerateError(f"--top-p={args.top_p} must be in (0, 1].")


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"--device {name} was asked for but CUDA is not available here; use --device cpu.")
    return device


def _tokenizer(spec: str | None, model_vocab_size: int):
    if spec is None:
        raise GenerateError("the checkpoint records no tokenizer; pass --tokenizer byte or --tokenizer PATH/tokenizer.json.")
    tokenizer = load_tokenizer(spec)
    if tokenizer.vocab_size > model_vocab_size:
        raise GenerateError(
            f"tokenizer {spec!r} has {tokenizer.vocab_size} ids but the model only {model_vocab_size}: this is not "
            "the tokenizer the model was trained with."
        )
    return tokenizer


def _check_tokenizer_identity(tokenizer, spec: str, stored_spec: str | None, recorded: str | None) -> None:
    """Another tokenizer whose vocabulary fits the model decodes its ids as other text (exit 0, gibberish)."""
    identity = tokenizer.identity() if hasattr(tokenizer, "identity") else {}
    if recorded is None or identity.get("hash") in (None, recorded):
        return
    raise GenerateError(
        f"tokenizer {spec!r} (sha256 {identity['hash'][:12]}) is not the one the model was trained with (sha256 "
        f"{recorded[:12]}, recorded as {stored_spec!r}): its ids would decode as other text; pass the training "
        "tokenizer with --tokenizer, or leave --tokenizer out to use the recorded one.")


def _read_prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return args.prompt
    try:
        with open(args.prompt_file, encoding="utf-8") as handle:
            prompts = [line.rstrip("\n") for line in handle if line.strip()]
    except OSError as error:
        raise GenerateError(f"cannot read --prompt-file: {error}") from error
    if not prompts:
        raise GenerateError(f"--prompt-file {args.prompt_file!r} holds no prompt (one prompt per non-empty line).")
    return prompts


def _encode(tokenizer, text: str, context: int, max_new_tokens: int) -> list[int]:
    """Token ids of one prompt; an empty prompt starts a new document (documents are EOS-separated)."""
    ids = tokenizer.encode(text) or [tokenizer.eos_id]
    if len(ids) + max_new_tokens > context:
        raise GenerateError(
            f"prompt {_preview(text)} is {len(ids)} tokens; with --max-new-tokens {max_new_tokens} that is "
            f"{len(ids) + max_new_tokens}, more than the model's context of {context} tokens. Shorten the prompt "
            f"or lower --max-new-tokens to at most {max(context - len(ids), 0)}."
        )
    return ids


def _warn_past_training_length(prompt_tokens: int, max_new_tokens: int, train_seq_len: int | None) -> None:
    """One line when the longest request passes the training sequence length (unknown: nothing to say)."""
    total = prompt_tokens + max_new_tokens
    if train_seq_len is None or total <= train_seq_len:
        return
    advice = (f"--max-new-tokens {train_seq_len - prompt_tokens} stays within it" if prompt_tokens < train_seq_len
              else "shorten the prompt to stay within it")
    print(f"diffv2-lit generate: warning: prompt ({prompt_tokens} tokens) + --max-new-tokens {max_new_tokens} = "
          f"{total} tokens, more than the {train_seq_len} the model was trained on: text past token "
          f"{train_seq_len} is likely to degrade ({advice}).", file=sys.stderr)


def _preview(text: str, width: int = 40) -> str:
    return repr(text if len(text) <= width else text[:width] + "...")


# ---- decoding -------------------------------------------------------------------------------------


def _equal_length_groups(encoded: list[list[int]]) -> list[list[int]]:
    """Prompt indices grouped by token count, in order of first appearance."""
    groups: dict[int, list[int]] = defaultdict(list)
    for index, ids in enumerate(encoded):
        groups[len(ids)].append(index)
    return list(groups.values())


EOS_CHECK_EVERY = 32  # batch mode reads "has every prompt ended?" back from the device once per this many tokens


def _generate_group(model, tokenizer, prompts, encoded, indices, args, generator, eos_id) -> int:
    """Decode one batch of equal-length prompts; returns the number of tokens generated."""
    device = model.embed_tokens.weight.device
    input_ids = torch.tensor([encoded[i] for i in indices], dtype=torch.long, device=device)
    decode = args.decode if args.decode != "auto" else ("cuda-graphs" if device.type == "cuda" else "eager")
    steps = model.stream(input_ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, generator=generator, decode=shared_decoder(model, decode))
    if len(prompts) == 1:  # one prompt: stream to the terminal as it is sampled
        _write(prompts[indices[0]])
        return _stream_one(steps, _TextStream(tokenizer), eos_id)
    rows, n_steps = _decode_batch(steps, eos_id)
    for row, index in zip(rows, indices):
        _write(f"=== prompt {index + 1} ===\n{prompts[index]}{tokenizer.decode(row)}\n")
    return n_steps * len(indices)


def _stream_one(steps, stream: _TextStream, eos_id: int | None) -> int:
    """Print each token's text as it arrives (one host read per token: the terminal needs it); stop at EOS."""
    n_tokens = 0
    for tokens in steps:
        n_tokens += 1
        token = int(tokens[0])
        if token == eos_id:
            break
        _write(stream.push(token))
    _write(stream.flush())
    return n_tokens


def _decode_batch(steps, eos_id: int | None) -> tuple[list[list[int]], int]:
    """(every prompt's new token ids, each cut before its first EOS; the decode steps run). The tokens stay on the device: whether
    all prompts have ended is read back once per EOS_CHECK_EVERY tokens, the ids once at the end (a read per
    token would drain a GPU's launch queue every step)."""
    sampled, ended = [], None
    for step, tokens in enumerate(steps):
        sampled.append(tokens)
        if eos_id is None:
            continue
        ended = tokens == eos_id if ended is None else ended | (tokens == eos_id)
        if (step + 1) % EOS_CHECK_EVERY == 0 and bool(ended.all()):
            break
    rows = torch.stack(sampled, dim=1).tolist()
    return [row[:row.index(eos_id)] if eos_id in row else row for row in rows], len(sampled)


class _TextStream:
    """Incremental detokenisation: emits only completed text (a multi-byte character split across byte
    tokens is held back until its last byte arrives), and `flush` emits the rest; the pieces joined are
    `tokenizer.decode(ids)`. Each push decodes only the ids since the last emitted piece (plus the piece
    before it, so a tokenizer that drops a leading space at the start of a decode drops it there), not the
    whole list: the work per token stays bounded however long the text grows (vLLM's incremental
    detokenisation)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.text = tokenizer, [], ""
        self._prefix = self._read = 0  # ids[prefix:read] decode to text already emitted; ids[read:] pending

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """The held-back rest (a character whose bytes never completed decodes to U+FFFD, as in a full decode)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""
        new = after[len(before):]
        self._prefix, self._read = self._read, len(self.ids)
        self.text += new
        return new


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
