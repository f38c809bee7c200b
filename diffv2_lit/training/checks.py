"""Checks that turn mistakes into messages naming the key to fix, before any heavy work starts.

Used by the CLI (cli.py) between parsing and training, and by `DecoderLM.on_load_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import re

import torch

from diffv2_lit.model import ModelConfig
from diffv2_lit.model.config import ConfigError

MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]
# Fields that change the parameter shapes or the computation: a checkpoint must agree on them.
SHAPE_FIELDS = ("vocab_size", "n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim",
                "tie_embeddings", "attention")


class UsageError(ValueError):
    """A configuration that cannot work; the message names the key and the fix (exit code 2)."""


class ResumeError(RuntimeError):
    """A checkpoint that does not belong to this model (exit code 1)."""


def model_config_error(err: ConfigError) -> UsageError:
    """`ConfigError` names bare fields (`n_kv_heads=3`); say which YAML keys they are."""
    named = [f for f in MODEL_FIELDS if re.search(rf"\b{f}\b", str(err))]
    keys = ", ".join(f"model.model.{f}" for f in named) or "model.model"
    return UsageError(f"{keys}: {err}")


def check_seq_len(model_config: ModelConfig, seq_len: int | None) -> None:
    if seq_len is not None and seq_len > model_config.max_seq_len:
        raise UsageError(
            f"data.seq_len={seq_len} is above the model's max_seq_len={model_config.max_seq_len} "
            f"(model.model.max_seq_len): lower data.seq_len, or raise model.model.max_seq_len to at least {seq_len}."
        )


def accumulation_for(global_batch_size: int, micro_batch: int | None, world_size: int,
                     configured_accumulation: int) -> int:
    """`accumulate_grad_batches` that makes `global_batch_size` sequences per optimizer step."""
    if global_batch_size < 1:
        raise UsageError(f"global_batch_size={global_batch_size} must be >= 1.")
    if micro_batch is None:
        raise UsageError("global_batch_size is set but the data module has no `batch_size` (the per-device "
                         "micro-batch) to derive the accumulation from; set trainer.accumulate_grad_batches instead.")
    per_step = micro_batch * world_size
    if global_batch_size % per_step:
        options = [b for b in range(1, micro_batch + 1) if global_batch_size % (b * world_size) == 0]
        raise UsageError(
            f"global_batch_size={global_batch_size} is not a multiple of data.batch_size={micro_batch} x "
            f"{world_size} device(s) = {per_step}: choose data.batch_size among {options} or a global_batch_size "
            f"that is a multiple of {per_step}."
        )
    accumulation = global_batch_size // per_step
    if configured_accumulation not in (1, accumulation):
        raise UsageError(
            f"trainer.accumulate_grad_batches={configured_accumulation} disagrees with global_batch_size="
            f"{global_batch_size} (= data.batch_size {micro_batch} x {world_size} device(s) x {accumulation}); "
            "set only one of them."
        )
    return accumulation


def model_mismatch(saved: dict, current: ModelConfig) -> str | None:
    """None when a checkpoint's `model_config` fits the current model, else what differs and the fix."""
    differing = [(f, saved.get(f), getattr(current, f)) for f in SHAPE_FIELDS
                 if f in saved and saved.get(f) != getattr(current, f)]
    if not differing:
        return None
    details = "; ".join(f"model.model.{f}: checkpoint {old!r}, this run {new!r}" for f, old, new in differing)
    fixes = " ".join(f"--model.model.{f} {old}" for f, old, _ in differing)
    hint = ""
    if any(f == "attention" for f, _, _ in differing):
        hint = f" (the checkpoint was trained with attention={saved['attention']!r}: use that variant's recipe)"
    return (f"the checkpoint's model does not match this run's: {details}. Resume with the recipe the checkpoint "
            f"was trained with{hint}, or pass {fixes}.")


def check_resume(saved_hparams: dict, current: ModelConfig, path: str) -> None:
    saved = saved_hparams.get("model_config")
    if not isinstance(saved, dict):
        return  # not a diffv2-lit checkpoint: Lightning's own load reports what it finds
    problem = model_mismatch(saved, current)
    if problem:
        raise ResumeError(f"cannot resume from {path}: {problem}")


def peek_hyper_parameters(path: str) -> dict:
    """`hyper_parameters` of a checkpoint without reading its tensors (mmap) or a sharded folder's meta.pt."""
    from pathlib import Path

    from diffv2_lit.training.atomic_io import LIGHTNING_META

    from diffv2_lit.training.safe_load import load_file

    path_ = Path(path)
    target = path_ / LIGHTNING_META if path_.is_dir() else path_
    checkpoint = load_file(target, mmap=not path_.is_dir())  # data only: refuses a checkpoint that needs more
    return checkpoint.get("hyper_parameters", {}) or {}


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


OOM_ADVICE = """out of memory: {error}
The model, batch and sequence length do not fit this device. Knobs, cheapest first:
  --data.init_args.batch_size N        a smaller per-device micro-batch; with --global_batch_size G
                                       the gradient accumulation grows to keep G sequences per step
  --model.activation_checkpointing true    recompute activations in backward (about -60% activation memory)
  --model.cpu_offload true             FSDP2 only: keep sharded parameters and optimizer state in CPU memory
  --data.init_args.seq_len N           shorter sequences (activations grow with seq_len)
  more GPUs with FSDP2 (configs/hardware/8gpu-fsdp2.yaml) to shard parameters and optimizer state
`diffv2_lit.training.memory.estimate_memory_gib` estimates the memory per GPU of a configuration."""


def one_line_parser_error(message: str) -> str:
    """jsonargparse's nested error report (a Union of subtypes, a Namespace dump) -> one line naming the key,
    the value and the choices, or the innermost message that one of our own __init__ checks raised.

    Two shapes come out of jsonargparse: a bad value for a typed key ("Parser key "model.model": ... Parser key
    "attention": ... Expected a typing.Literal[...] ... Given value: diffv3"), and a class whose __init__
    refused its arguments ("Errors: - data.batch_size must be >= 1, got 0 - Expected a <class 'NoneType'>").
    Anything else is returned unchanged.
    """
    keys = re.findall(r'Parser key "([^"]+)"', message)
    own = [m for m in re.findall(r"^\s*- (.+)$", message, re.M)
           if not m.startswith(("Expected a ", "Problem with given class_path"))]
    if not keys:
        return own[0] if own else message
    key = _nested_key(keys)
    choices = [c.strip().strip("'\"") for group in re.findall(r"Literal\[([^\]]+)\]", message) for c in group.split(",")]
    values = re.findall(r"(?:Given value|Got value): (.*)$", message, re.M)
    value = values[0] if values else None
    if choices and value is not None:
        return f"{key}: {value!r} is not one of: {', '.join(dict.fromkeys(choices))}"
    if own:
        return f"{key}: {own[0]}"
    if value is not None:
        expected = re.findall(r"Expected a (?:<class '([^']+)'>|(.+?))[.]?(?: Got value|$)", message, re.M)
        hint = f" (expected {next(filter(None, expected[0]))})" if expected else ""
        return f"{key}: invalid value {value!r}{hint}"
    return message


def _nested_key(keys: list[str]) -> str:
    """["model.model", "attention"] -> "model.model.attention" (jsonargparse names nested keys relatively)."""
    full = keys[0]
    for key in keys[1:]:
        full = key if key.startswith(full + ".") else f"{full}.{key}"
    return full
