"""Does a checkpoint belong to this model? Its `hyper_parameters["model_config"]` against the run's ModelConfig."""

from __future__ import annotations

from pathlib import Path

from diffv2_lit.checkpoint.errors import ResumeError
from diffv2_lit.checkpoint.layout import LIGHTNING_META
from diffv2_lit.checkpoint.safe_load import load_complete
from diffv2_lit.model import ModelConfig
from diffv2_lit.model.config import CONFIG_PATH

# Fields that change the parameters or what they mean: weights load only into a model that agrees on them
# (`init_from` needs these alone).
SHAPE_FIELDS = ("vocab_size", "n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "ffn_hidden_dim",
                "tie_embeddings", "attention")
# Fields that change the computation with the same parameters (RoPE frequencies, the norms' epsilon, the
# positions trained): a resume continues one run, so it must agree on these too. `init_from` may change
# them (fine-tuning at a longer context, another RoPE base).
COMPUTATION_FIELDS = ("rope_theta", "norm_eps", "max_seq_len")
RESUME_FIELDS = SHAPE_FIELDS + COMPUTATION_FIELDS


def differing_fields(saved: dict, current: ModelConfig, fields: tuple[str, ...] = RESUME_FIELDS
                     ) -> list[tuple[str, object, object]]:
    """[(field, checkpoint's value, this run's value)] for the `fields` (a resume's, unless told) that a
    checkpoint's `model_config` sets differently."""
    return [(f, saved[f], getattr(current, f)) for f in fields if f in saved and saved[f] != getattr(current, f)]


def model_mismatch(saved: dict, current: ModelConfig, fields: tuple[str, ...] = SHAPE_FIELDS) -> str | None:
    """None when a checkpoint's `model_config` agrees with the current model on `fields` (SHAPE_FIELDS: its
    weights load, as `init_from` needs; RESUME_FIELDS: the run continues, as a resume needs), else what
    differs and the fix."""
    differing = differing_fields(saved, current, fields)
    if not differing:
        return None
    details = "; ".join(f"{CONFIG_PATH}.{f}: checkpoint {old!r}, this run {new!r}" for f, old, new in differing)
    fixes = " ".join(f"--{CONFIG_PATH}.{f} {old}" for f, old, _ in differing)
    hint = ""
    if any(f == "attention" for f, _, _ in differing):
        hint = f" (the checkpoint was trained with attention={saved['attention']!r}: use that variant's recipe)"
    return (f"the checkpoint's model does not match this run's: {details}. Resume with the recipe the checkpoint "
            f"was trained with{hint}, or pass {fixes}.")


def check_resume(saved_hparams: dict, current: ModelConfig, path: str) -> None:
    saved = saved_hparams.get("model_config")
    if not isinstance(saved, dict):
        return  # not a diffv2-lit checkpoint: Lightning's own load reports what it finds
    problem = model_mismatch(saved, current, RESUME_FIELDS)
    if problem:
        raise ResumeError(f"cannot resume from {path}: {problem}")


def peek_hyper_parameters(path: str) -> dict:
    """`hyper_parameters` of a complete checkpoint without reading its tensors (mmap) or a sharded folder's
    meta.pt; CheckpointError for an incomplete or damaged one."""
    path_ = Path(path)
    target = path_ / LIGHTNING_META if path_.is_dir() else path_
    checkpoint = load_complete(path_, target, mmap=not path_.is_dir())  # data only: refuses what needs more
    return checkpoint.get("hyper_parameters", {}) or {}


def check_resumable(path: str, current: ModelConfig) -> None:
    """Complete, readable as data, and of this model; else a CheckpointError saying what to use instead.
    Cheap: no tensor is read (the file is memory-mapped, a sharded folder's `meta.pt` alone is loaded)."""
    check_resume(peek_hyper_parameters(path), current, path)
