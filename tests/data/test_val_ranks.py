"""`validate` of one checkpoint gives one `val/loss` whatever the number of processes (issue 19.9).

Real runs: `diffv2-lit fit` writes the checkpoint, `diffv2-lit validate` reads it on 1, 2 and 3 CPU processes
(DDP, gloo) and prints its table of metrics, which the test reads. 35 validation blocks: not a multiple of 2 or 3, so
Lightning's DistributedSampler would count a block twice (it pads by repeating the first ones)."""

import re

import pytest

from diffv2_lit.data.prepare import prepare
from tests.data.conftest import diffv2_lit, make_docs, write_jsonl, write_run

VAL_BLOCKS = 35


def _ok(result):
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]


@pytest.mark.slow  # four runs, six processes: about 80 s on 2 cores
def test_validation_loss_does_not_depend_on_the_process_count(tmp_path):
    prepare([str(write_jsonl(tmp_path / "docs.jsonl", make_docs(300)))], tmp_path / "data", val_fraction=0.2,
            num_workers=1, verbose=False, summary=False)
    write_run(tmp_path, max_steps=2, val_tokens=32 * VAL_BLOCKS)  # seq_len 32
    _ok(diffv2_lit(tmp_path, "fit"))
    checkpoint = tmp_path / "runs" / "data" / "version_0" / "checkpoints" / "last.ckpt"
    losses = {}
    for processes in (1, 2, 3):
        result = diffv2_lit(tmp_path, "validate", "--ckpt_path", str(checkpoint), "--trainer.devices", str(processes),
                            "--trainer.strategy", "ddp", "--trainer.limit_val_batches", "null")
        _ok(result)
        # validate writes no run folder (issue 25.4): the loss is read from the table it prints
        (losses[processes],) = [float(v) for v in re.findall(r"val/loss\s+│\s+(\S+)", result.stdout)]
    assert losses[2] == pytest.approx(losses[1], rel=1e-6, abs=0)
    assert losses[3] == pytest.approx(losses[1], rel=1e-6, abs=0)
