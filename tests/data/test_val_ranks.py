"""`validate` of one checkpoint gives one `val/loss` whatever the number of processes (issue 19.9).

Real runs: `diffv2-lit fit` writes the checkpoint, `diffv2-lit validate` reads it on 1, 2 and 3 CPU processes
(DDP, gloo) and logs to TensorBoard, which the test reads back. 35 validation blocks: not a multiple of 2 or 3, so
Lightning's DistributedSampler would count a block twice (it pads by repeating the first ones)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffv2_lit.data.prepare import prepare
from tests.data.conftest import make_docs, write_jsonl
from tests.faults.helpers import scalars

ROOT = Path(__file__).parents[2]
SEQ_LEN = 32
VAL_BLOCKS = 35
RUN = f"""\
seed_everything: 7
trainer:
  accelerator: cpu
  precision: 32-true
  max_steps: 2
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: runs, name: val}}
model:
  architecture: {{preset: quickstart, n_layers: 1, dim: 32, n_heads: 2, n_kv_heads: 1, head_dim: 16, ffn_hidden_dim: 64,
                 max_seq_len: 64}}
data:
  class_path: diffv2_lit.data.datamodule.TokenDataModule
  init_args: {{data_dir: data, seq_len: {SEQ_LEN}, batch_size: 2, num_workers: 0, val_tokens: {SEQ_LEN * VAL_BLOCKS}}}
"""


def _run(tmp_path: Path, command: str, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
           "DIFFV2_LIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "diffv2_lit", command, "--config", "run.yaml", *overrides], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow  # four runs, six processes: about 2 minutes on 2 cores
def test_validation_loss_does_not_depend_on_the_process_count(tmp_path):
    prepare([str(write_jsonl(tmp_path / "docs.jsonl", make_docs(300)))], tmp_path / "data", val_fraction=0.2,
            num_workers=1, verbose=False, summary=False)
    (tmp_path / "run.yaml").write_text(RUN)
    _run(tmp_path, "fit")
    checkpoint = tmp_path / "runs" / "val" / "version_0" / "checkpoints" / "epoch=0-step=2.ckpt"
    losses = {}
    for version, processes in enumerate((1, 2, 3), start=1):
        _run(tmp_path, "validate", "--ckpt_path", str(checkpoint), "--trainer.devices", str(processes),
             "--trainer.strategy", "ddp", "--trainer.limit_val_batches", "null")
        (losses[processes],) = scalars(tmp_path / "runs" / "val" / f"version_{version}", "val/loss").values()
    assert losses[2] == pytest.approx(losses[1], rel=1e-6, abs=0)
    assert losses[3] == pytest.approx(losses[1], rel=1e-6, abs=0)
