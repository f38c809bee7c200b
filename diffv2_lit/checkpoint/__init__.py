"""Checkpoints and exports: their layout, atomic writing, reading as data only, compatibility, consolidation.

    layout.py       the on-disk layout, and telling a complete checkpoint from a half-written one
    safe_load.py    the one loader: torch.load(weights_only=True) with an allow-list, DCP readers, the opt-in
    atomic_io.py    AtomicCheckpointIO: Lightning's CheckpointIO with atomic saves and safe loads
    reading.py      a ready model (or its state dict) from a .ckpt, a sharded folder or an export folder
    compat.py       does a checkpoint belong to this model?
    consolidate.py  shards -> one file (`diffv2-lit consolidate` is cli/consolidate.py)
    hf_format.py    ModelConfig / state-dict names <-> Hugging Face Llama (and modeling_diffv2) ones
    errors.py       CheckpointError (exit 1) and CheckpointPathError (a path naming no checkpoint, exit 2)

Training and inference use this package and know nothing of the layout themselves.
"""

from diffv2_lit.checkpoint.errors import CheckpointError, CheckpointPathError, ResumeError
from diffv2_lit.checkpoint.safe_load import UntrustedCheckpointError

__all__ = ["CheckpointError", "CheckpointPathError", "ResumeError", "UntrustedCheckpointError"]
