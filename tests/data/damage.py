"""A test-only callback that damages the prepared data under a running `diffv2-lit fit`, as another shell
would (given on the command line: `--trainer.callbacks+=tests.data.damage.DamageData`)."""

from __future__ import annotations

from pathlib import Path

import lightning as L


class DamageData(L.Callback):
    """At the start of optimizer step `step`: `delete` / `truncate` (in place) every training chunk of
    `folder`, or `reprepare` it from `source` with `prepare --overwrite` (a new index)."""

    def __init__(self, folder: str, step: int, action: str, source: str = "") -> None:
        if action not in ("delete", "truncate", "reprepare"):
            raise ValueError(f"action must be delete, truncate or reprepare, got {action!r}")
        self.folder, self.step, self.action, self.source = Path(folder), step, action, source
        self.done = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.done or trainer.global_step < self.step:
            return
        self.done = True
        chunks = sorted((self.folder / "train").glob("chunk-*.bin"))
        if self.action == "delete":
            for chunk in chunks:
                chunk.unlink()
        elif self.action == "truncate":
            for chunk in chunks:
                with open(chunk, "r+b") as f:
                    f.truncate(64)  # the header survives, the tokens are gone
        else:
            from diffv2_lit.data.prepare import prepare

            prepare([self.source], self.folder, overwrite=True, chunk_size=2048, val_fraction=0.1, num_workers=1,
                    verbose=False, summary=False)
