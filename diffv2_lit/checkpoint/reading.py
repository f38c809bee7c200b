"""One loader for every place a trained model lives.

- a Lightning checkpoint file (`.ckpt`): torch.save dict, `state_dict` keys `model.<Transformer key>`,
  `hyper_parameters["model_config"]` (dataclasses.asdict(ModelConfig)), optional `hyper_parameters["tokenizer"]`;
- a sharded FSDP2 checkpoint directory (torch.distributed.checkpoint, as Lightning's ModelParallelStrategy
  writes it): the same `state_dict` under DCP, the hyper-parameters in `meta.pt` beside it;
- a folder written by `diffv2-lit export` (config.json + model.safetensors), or a plain Llama folder.

`load_for_inference` returns a ready Transformer in eval mode, its config, the tokenizer spec and the sequence
length it was trained at: the datamodule's `seq_len` in a Lightning checkpoint or `meta.pt`, `train_seq_len` in an
export's config.json); `load_state_dict_for_training` returns the raw pieces for `--model.init_from`
(continued training). Pickled parts are read as data only
(`diffv2_lit.checkpoint.safe_load`): a checkpoint that needs more raises `UntrustedCheckpointError`
unless trusted (DIFFV2_LIT_TRUST_CHECKPOINTS=1, or `with safe_load.trusting(): ...`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import NamedTuple

import torch

from diffv2_lit.checkpoint import hf_format
from diffv2_lit.checkpoint.errors import CheckpointError, CheckpointPathError
from diffv2_lit.checkpoint.layout import DCP_METADATA, LIGHTNING_META, is_export, is_sharded
from diffv2_lit.checkpoint.safe_load import (DamagedCheckpointError, UntrustedCheckpointError, error_reason, load_file,
                                            load_meta_pt, load_sharded, looks_sharded, missing_index_error)
from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.model.config import flash_attn_available
MAX_LISTED_KEYS = 8



class _Checkpoint(NamedTuple):
    config: ModelConfig
    state_dict: dict[str, torch.Tensor]
    tokenizer_spec: str | None
    train_seq_len: int | None  # None when the checkpoint does not record it


class LoadedModel(NamedTuple):
    model: Transformer
    config: ModelConfig
    tokenizer_spec: str | None
    train_seq_len: int | None  # the training sequence length, when recorded: past it the model has not learned


def load_for_inference(path, device="cpu", dtype: torch.dtype | None = None) -> LoadedModel:
    """-> (Transformer in eval mode, ModelConfig, tokenizer spec or None, the sequence length the model was trained
    at or None). dtype None keeps the stored dtype."""
    config, state_dict, tokenizer_spec, train_seq_len = _read_checkpoint(Path(path))
    check_state_dict(config, state_dict, source=str(path))
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict(state_dict, assign=True)  # assign: take the loaded tensors, no second copy
    model.to(device=device, dtype=dtype)
    return LoadedModel(model.eval(), config, tokenizer_spec, train_seq_len)


def recorded_tokenizer_sha256(path) -> str | None:
    """The sha256 of the tokenizer a checkpoint was trained with (DecoderLM records it), None when unrecorded
    (an export folder, a checkpoint of an older version). Reads no tensor."""
    path = Path(path)
    if is_sharded(path):
        hparams = load_meta_pt(path).get("hyper_parameters") or {}
    elif path.is_file():
        hparams = load_file(path, mmap=True).get("hyper_parameters") or {}
    else:
        return None
    value = hparams.get("tokenizer_sha256")
    return value if isinstance(value, str) else None


def load_state_dict_for_training(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (dataclasses.asdict(ModelConfig), state dict with Transformer keys, i.e. without `model.`).

    For `--model.init_from`: accepts the same three kinds of path as load_for_inference, checks that the weights
    fit the config, and leaves dtype and attention backend exactly as stored.
    """
    config, state_dict, _, _ = _read_checkpoint(Path(path))
    check_state_dict(config, state_dict, source=str(path))
    return dataclasses.asdict(config), state_dict


def checkpoint_kind(path: Path) -> str:
    """'lightning' (a file), 'dcp' (a sharded checkpoint directory) or 'hf' (an exported folder)."""
    if path.is_file():
        return "lightning"
    if is_sharded(path):
        return "dcp"
    if is_export(path):
        return "hf"
    if not path.exists():
        raise CheckpointPathError(f"checkpoint {str(path)!r} does not exist.")
    if looks_sharded(path):
        raise missing_index_error(path)
    raise CheckpointPathError(
        f"{str(path)!r} is a directory but neither a sharded checkpoint (no {DCP_METADATA} file) nor an exported "
        "model (no config.json). Pass a Lightning .ckpt file, a sharded checkpoint directory, or an export folder."
    )


def _read_checkpoint(path: Path) -> _Checkpoint:
    readers = {"lightning": _read_lightning_file, "dcp": _read_dcp_dir, "hf": _read_hf_folder}
    return readers[checkpoint_kind(path)](path)


# ---- Lightning checkpoints ------------------------------------------------------------------------


def _read_lightning_file(path: Path):
    try:
        checkpoint = load_file(path, mmap=True)  # mmap keeps a large checkpoint's tensors on disk until used
    except UntrustedCheckpointError:
        raise
    except Exception as error:  # noqa: BLE001 - any unpickling failure means "not a checkpoint"
        raise DamagedCheckpointError(f"{str(path)!r} is not a readable PyTorch/Lightning checkpoint "
                                     f"({error_reason(error)}): truncated, damaged or not a checkpoint; copy it again "
                                     "from where it was saved, or use another one.") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{str(path)!r} has no 'state_dict': not a Lightning checkpoint of a diffv2-lit model.")
    config, tokenizer_spec = _config_from_hparams(checkpoint.get("hyper_parameters", {}), path)
    return _Checkpoint(config, _model_weights(checkpoint["state_dict"], path), tokenizer_spec,
                       _train_seq_len(checkpoint))


def _read_dcp_dir(path: Path):
    metadata = load_meta_pt(path)
    config, tokenizer_spec = _config_from_hparams(metadata.get("hyper_parameters", {}), path / LIGHTNING_META)
    # Only the model's keys: the optimizer states beside them are twice the model's size.
    loaded = load_sharded(path, keys={"state_dict"})
    return _Checkpoint(config, _model_weights(loaded.get("state_dict", {}), path), tokenizer_spec,
                       _train_seq_len(metadata))


def _train_seq_len(checkpoint: dict) -> int | None:
    """The datamodule's `seq_len` (TokenDataModule saves its hyper-parameters; Lightning stores them in the
    checkpoint, and in `meta.pt` beside a sharded one)."""
    return hf_format.positive_int_or_none((checkpoint.get("datamodule_hyper_parameters") or {}).get("seq_len"))


def _config_from_hparams(hparams: dict, source: Path) -> tuple[ModelConfig, str | None]:
    model_config = hparams.get("model_config")
    if model_config is None:
        raise CheckpointError(
            f"{str(source)!r} has no hyper_parameters['model_config']: it was not written by diffv2-lit's DecoderLM "
            "(or is from an older version). Export it from the training code, or rebuild the config by hand."
        )
    if isinstance(model_config, ModelConfig):
        model_config = dataclasses.asdict(model_config)
    return _config_from_dict(model_config, source), hparams.get("tokenizer")


def _config_from_dict(fields: dict, source) -> ModelConfig:
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise CheckpointError(f"model config in {str(source)!r} has fields this version does not know: {unknown}.")
    if fields.get("attn_backend") == "flash" and not flash_attn_available():
        # Trained with flash-attn, read where it is not installed: same math through SDPA.
        fields = {**fields, "attn_backend": "auto"}
    return ModelConfig(**fields)


def _model_weights(state_dict: dict, source: Path) -> dict[str, torch.Tensor]:
    """`model.<key>` entries without the prefix. Training leaves no wrapper in the names: blocks compile in place
    and the activation-checkpoint wrapper's state dict drops its own segment (tests/inference/test_loading.py)."""
    weights = {key.removeprefix("model."): value for key, value in state_dict.items() if key.startswith("model.")}
    if not weights:
        raise CheckpointError(f"{str(source)!r} holds no 'model.*' weights (found keys like {list(state_dict)[:3]}).")
    return weights


# ---- exported folders -----------------------------------------------------------------------------


def _read_hf_folder(path: Path):
    from safetensors.torch import load_file

    hf = json.loads((path / "config.json").read_text())
    try:
        fields = hf_format.model_config_fields_from_hf(hf)
    except (ValueError, KeyError) as error:
        raise CheckpointError(f"{str(path / 'config.json')!r} does not describe a supported model: {error}") from error
    config = _config_from_dict(fields, path / "config.json")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(path)!r} has a config.json but no *.safetensors weights.")
    state_dict = {}
    for file in files:  # one file, or the shards of a save_pretrained(max_shard_size=...) folder
        state_dict.update(load_file(file))
    return _Checkpoint(config, hf_format.from_hf_keys(state_dict, config), _folder_tokenizer_spec(path, hf),
                       hf_format.train_seq_len_from_hf(hf))


def _folder_tokenizer_spec(path: Path, hf: dict) -> str | None:
    spec = (hf.get("diffv2_lit") or {}).get("tokenizer")
    if spec == "byte":
        return "byte"
    # A BPE tokenizer travels with the folder; the path it was trained at may no longer exist.
    return str(path / "tokenizer.json") if (path / "tokenizer.json").is_file() else spec


# ---- checks ---------------------------------------------------------------------------------------


def check_state_dict(config: ModelConfig, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming missing/unexpected keys and wrong shapes, if the weights do not fit."""
    with torch.device("meta"):
        expected = {key: tuple(t.shape) for key, t in Transformer(config).state_dict().items()}
    found = {key: tuple(t.shape) for key, t in state_dict.items()}
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    wrong = [f"{key}: checkpoint {found[key]}, config {expected[key]}"
             for key in sorted(expected.keys() & found.keys()) if found[key] != expected[key]]
    if not (missing or unexpected or wrong):
        return
    problems = [f"{label} ({len(items)}): {_listing(items)}"
                for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("shape mismatches", wrong)) if items]
    raise CheckpointError(
        f"the weights in {source!r} do not match its model config (attention={config.attention!r}, "
        f"n_layers={config.n_layers}, dim={config.dim}, n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, "
        f"head_dim={config.head_dim}, vocab_size={config.vocab_size}):\n  " + "\n  ".join(problems)
    )


def _listing(items: list[str]) -> str:
    shown = "; ".join(items[:MAX_LISTED_KEYS])
    return shown + (f"; ... and {len(items) - MAX_LISTED_KEYS} more" if len(items) > MAX_LISTED_KEYS else "")
