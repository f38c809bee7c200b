"""Issue 23.3: resuming on another number of processes is said in one line, and keeps its promise.

A DDP run on 2 processes (micro-batch 4) is resumed from its step-3 checkpoint on 1 process with micro-batch 8
(the same global batch): the resumed run says so, and its losses are the 2-process run's, step for step
(LitData shares the remaining chunks out over the new processes). A resume with another global batch says
what changed and how to keep it."""

import pytest

from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import output, run_dir, scalars

TEXT = ("--data", "diffv2_lit.data.datamodule.TokenDataModule", "--data.init_args.data_dir", "builtin:shakespeare",
        "--data.init_args.tokenizer", "byte", "--data.init_args.seq_len", "32", "--data.init_args.batch_size", "4",
        "--data.init_args.num_workers", "0", "--model.architecture.vocab_size", "320", "--trainer.max_steps", "6")


def test_two_processes_resumed_on_one_say_so_and_continue_step_for_step(tmp_path):
    two = fit(tmp_path, *TEXT, "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert two.returncode == 0, output(two)[-3000:]
    written = scalars(run_dir(tmp_path, 0), "train/loss")

    step3 = run_dir(tmp_path, 0) / "checkpoints" / "epoch=0-step=3.ckpt"
    one = fit(tmp_path, *TEXT, "--data.init_args.batch_size", "8", "--ckpt_path", str(step3))
    assert one.returncode == 0, output(one)[-3000:]
    assert ("resuming at step 3 with 1 process (the checkpoint was written by 2 processes): the same 8 sequences "
            "per optimizer step; the run continues as it would have") in one.stdout, one.stdout[-3000:]
    resumed = scalars(run_dir(tmp_path, 1), "train/loss")
    assert sorted(resumed) == [3, 4, 5]
    assert [resumed[s] for s in (3, 4, 5)] == pytest.approx([written[s] for s in (3, 4, 5)], rel=1e-5)

    other = fit(tmp_path, *TEXT, "--ckpt_path", str(step3), "--trainer.max_steps", "4")
    assert other.returncode == 0, output(other)[-3000:]
    assert ("1 process (the checkpoint was written by 2 processes): 4 sequences per optimizer step instead of 8: set "
            "data.batch_size or trainer.accumulate_grad_batches (or --global_batch_size)") in other.stdout
