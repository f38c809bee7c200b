"""Two-process DDP run (CPU, gloo) for test_rank_zero.py: DiffMonitor and SampleText every 2 steps; each rank
writes how many diagnostic forwards and generation forwards it ran.

Run as `python tests/callbacks/rank_zero_run.py OUT_DIR`; Lightning relaunches this script for rank 1.
"""

import json
import os
import sys

import lightning as L

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))  # the repository root
from tests.callbacks.conftest import TinyLM, token_loader  # noqa: E402

from diffv2_lit.callbacks import DiffMonitor, SampleText  # noqa: E402


class SamplingLM(TinyLM):
    """TinyLM with what SampleText reads from the module protocol (callbacks/protocol.py)."""

    @property
    def model_config(self):
        return self.model.config


def main(out_dir: str) -> None:
    module = SamplingLM()
    counts = {"diagnostic_forwards": 0, "generation_forwards": 0}

    def count_diagnostics(attention, args):
        counts["diagnostic_forwards"] += attention.diagnostics is not None

    def count_generation(model, args):
        counts["generation_forwards"] += len(args) > 1 and args[1] is not None  # forward(ids, cache)

    module.model.layers[0].self_attn.register_forward_pre_hook(count_diagnostics)
    module.model.register_forward_pre_hook(count_generation)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_steps=6,
        callbacks=[DiffMonitor(every_n_steps=2), SampleText(every_n_steps=2, max_new_tokens=4, prompt="\x05\x06")],
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=out_dir,
    )
    trainer.fit(module, token_loader())
    with open(os.path.join(out_dir, f"rank{trainer.global_rank}.json"), "w") as f:
        json.dump(counts, f)


if __name__ == "__main__":
    main(sys.argv[1])
