"""Usage errors of `diffv2-lit fit|validate`: a mistake in the configuration becomes one line naming the key
(exit code 2), before any heavy work starts."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re

import torch

from diffv2_lit.errors import UsageError
from diffv2_lit.model import ModelConfig
from diffv2_lit.model.config import CONFIG_PATH, ConfigError
from diffv2_lit.training.parallel import MOVED_TO_PARALLEL

MODEL_FIELDS = [f.name for f in dataclasses.fields(ModelConfig)]


def model_config_error(err: ConfigError) -> UsageError:
    """`ConfigError` names bare fields (`n_kv_heads=3`); say which YAML keys they are."""
    named = [f for f in MODEL_FIELDS if re.search(rf"\b{f}\b", str(err))]
    keys = ", ".join(f"{CONFIG_PATH}.{f}" for f in named) or CONFIG_PATH
    return UsageError(f"{keys}: {err}")


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


def is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(err, RuntimeError) and "out of memory" in str(err).lower()


OOM_ADVICE = """out of memory: {error}
The model, batch and sequence length do not fit this device. Knobs, cheapest first:
  --data.init_args.batch_size N        a smaller per-device micro-batch; with --global_batch_size G
                                       the gradient accumulation grows to keep G sequences per step
  --model.parallel.activation_checkpointing true    recompute activations in backward (about -60% activation memory)
  --model.parallel.cpu_offload true    FSDP2 only: keep sharded parameters and optimizer state in CPU memory
  --data.init_args.seq_len N           shorter sequences (activations grow with seq_len)
  more GPUs with FSDP2 (configs/hardware/8gpu-fsdp2.yaml) to shard parameters and optimizer state
`diffv2_lit.training.memory.estimate_memory_gib` estimates the memory per GPU of a configuration."""


def one_line_parser_error(message: str, typed: list[str] = (), options: list[str] = ()) -> str:
    """jsonargparse's nested error report (a Union of subtypes, a Namespace dump) -> one line naming the key,
    the value and the choices, or the innermost message that one of our own __init__ checks raised.

    Shapes that come out of jsonargparse: an unknown key under a class ("Parser key "data": ... Problem with
    given class_path '...TokenDataModule': Option 'tokeniser' is not accepted"), an unknown top-level flag
    ("unrecognized arguments: --trainer.max_stepz 3") or YAML key ("Subcommand 'fit' does not accept option
    'trainer.max_step'"), a bad value for a typed key ("Parser key "model.model": ... Parser key "attention":
    ... Expected a typing.Literal[...] ... Given value: diffv3"), and a class whose __init__ refused its
    arguments ("Errors: - data.batch_size must be >= 1, got 0 - Expected a <class 'NoneType'>"). Anything
    else is returned unchanged. `typed` is the command line (to name a key as the user spelled it), `options`
    the parser's own flags (to suggest the closest one).
    """
    unknown = _unknown_nested_key(message, typed) or _unknown_flag(message, options)
    if unknown:
        return unknown
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


def _unknown_nested_key(message: str, typed: list[str]) -> str | None:
    """`--data.tokeniser x` (or `tokeniser:` under `data:` in YAML): jsonargparse's "Option 'tokeniser' is not
    accepted" by the class behind `data`, which it buries under a Union report ending in "expected NoneType"."""
    found = re.search(r"Problem with given class_path '([^']+)':\s*Option '([^']+)' is not accepted", message)
    keys = re.findall(r'Parser key "([^"]+)"', message)
    if not found or not keys:
        return None
    class_path, option = found.groups()
    parent = _nested_key(keys)
    names = _init_parameters(class_path)
    close = difflib.get_close_matches(option, names, n=1, cutoff=0.6)
    class_name = class_path.rsplit(".", 1)[-1]
    hint = f"did you mean '{close[0]}'?" if close else f"its options: {', '.join(names)}"
    return (f"{_as_typed(parent, option, typed, message)}: {class_name} has no option '{option}'; {hint}  "
            f"(`diffv2-lit fit --{parent}.help {class_name}` describes them)")


def _as_typed(parent: str, option: str, typed: list[str], message: str) -> str:
    """The key as the user wrote it: `data.tokeniser` or `data.init_args.tokeniser` on the command line;
    from a YAML file, with `init_args` where the file's value had it."""
    for arg in typed:
        name = arg.split("=", 1)[0]
        if name.startswith(f"--{parent}.") and name.endswith(f".{option}"):
            return name[2:]
    given = re.findall(r"Given value: (.*)$", message, re.M)
    if given and "'init_args':" in given[-1]:
        return f"{parent}.init_args.{option}"
    return f"{parent}.{option}"


def _init_parameters(class_path: str) -> list[str]:
    """The keyword arguments a class accepts (what jsonargparse offers under its key)."""
    module_name, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), name)
        parameters = inspect.signature(cls).parameters.values()
    except (ImportError, AttributeError, TypeError, ValueError):
        return []
    return [p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _unknown_flag(message: str, options: list[str]) -> str | None:
    """An unknown flag or YAML key, with the closest one the parser has."""
    flags = re.match(r"unrecognized arguments: (.*)$", message)
    yaml_key = re.match(r"Subcommand '[^']+' does not accept option '([^']+)'", message)
    if flags:
        unknown = next((word for word in flags.group(1).split() if word.startswith("--")), None)
        name = unknown.split("=", 1)[0] if unknown else None
        known = [o for o in options if o.startswith("--")]
    elif yaml_key:
        name, known = yaml_key.group(1), [o[2:] for o in options if o.startswith("--")]
    else:
        return None
    if name and name.lstrip("-") in MOVED_TO_PARALLEL:
        new = MOVED_TO_PARALLEL[name.lstrip("-")]
        return (f"{name.lstrip('-')} is now {new} (the parallelism settings are grouped under model.parallel): "
                f"write {'--' + new if flags else new}")
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.8) if name else []
    if not close:
        return None
    return f"{message}; did you mean {close[0] if flags else repr(close[0])}?"
