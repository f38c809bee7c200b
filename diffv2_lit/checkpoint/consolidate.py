"""A sharded (distributed) checkpoint folder -> one ordinary checkpoint file (`diffv2-lit consolidate`, cli/consolidate.py).

Under FSDP2 (`ModelParallelStrategy`) every rank writes its own shard into a folder named like
`step=1000.ckpt/` (torch.distributed.checkpoint files plus Lightning's `meta.pt`); nothing is
gathered on rank 0 while training. This command merges the shards on one machine's CPU and writes
a single file with Lightning's layout (`state_dict` keys `model.<Transformer key>`,
`hyper_parameters` incl. `model_config`, and optionally the optimizer state), which
`DecoderLM.load_from_checkpoint`, `diffv2-lit generate` and `diffv2-lit export` read.

The shards, their index and `meta.pt` are read as data only (diffv2_lit.checkpoint.safe_load): a folder
that needs anything more is refused unless trusted (`safe_load.trusting`, or DIFFV2_LIT_TRUST_CHECKPOINTS=1).
"""

from __future__ import annotations

from pathlib import Path

from diffv2_lit.checkpoint.atomic_io import AtomicCheckpointIO
from diffv2_lit.checkpoint.errors import CheckpointPathError
from diffv2_lit.checkpoint.layout import DCP_METADATA, is_sharded
from diffv2_lit.checkpoint.safe_load import load_meta_pt, load_sharded, looks_sharded, missing_index_error


def consolidate(sharded_dir: str | Path, output: str | Path, with_optimizer: bool = False) -> Path:
    """Merge a distributed checkpoint folder into one `torch.save` file; returns the output path."""
    sharded_dir, output = Path(sharded_dir), Path(output)
    if not sharded_dir.exists():
        raise CheckpointPathError(f"checkpoint folder {sharded_dir} does not exist.")
    if not is_sharded(sharded_dir) and looks_sharded(sharded_dir):
        raise missing_index_error(sharded_dir)
    if not is_sharded(sharded_dir):
        raise CheckpointPathError(
            f"{sharded_dir} is not a sharded checkpoint folder (no {DCP_METADATA} inside); single-file checkpoints "
            "need no consolidation."
        )
    checkpoint = load_meta_pt(sharded_dir)  # first: a damaged folder fails before the shards are read
    # What torch's dcp_to_torch_save does, without its unrestricted reads and the temporary file.
    # The optimizer state is about twice the model's size: read it only when it is kept.
    merged = load_sharded(sharded_dir, keys=None if with_optimizer else {"state_dict"})
    checkpoint["state_dict"] = merged["state_dict"]
    optimizers = [merged[key] for key in sorted(merged) if key.startswith("optimizer_")]
    if optimizers:
        checkpoint["optimizer_states"] = optimizers
    AtomicCheckpointIO().save_checkpoint(checkpoint, output)  # a killed run leaves no truncated file behind
    return output
