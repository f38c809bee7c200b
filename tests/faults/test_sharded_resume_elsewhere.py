"""Issue 19.15: a sharded (FSDP2) checkpoint resumed under another strategy names the fixes that work.

Only `ModelParallelStrategy` resumes a sharded folder; under one process or DDP the message used to suggest
`last.ckpt`, another sharded folder that fails the same way. The message now names FSDP2 and `consolidate
--with-optimizer`, and following the second fix as written resumes the run on one process."""

import shlex

from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import output, run_dir, tool

MODEL = ("--model.architecture.vocab_size", "320")
FSDP2 = ("trainer:\n  devices: 2\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
         "    init_args: {data_parallel_size: 2, tensor_parallel_size: 1}\n"
         "model:\n  parallel:\n    fsdp_param_dtype: null\n    fsdp_reduce_dtype: null\n")


def test_a_sharded_folder_under_one_process_names_fsdp2_and_consolidate_and_the_fix_resumes(tmp_path):
    (tmp_path / "fsdp2.yaml").write_text(FSDP2)
    written = fit(tmp_path, "--config", str(tmp_path / "fsdp2.yaml"), *MODEL, "--trainer.max_steps", "3")
    assert written.returncode == 0, output(written)[-3000:]
    folder = run_dir(tmp_path, 0) / "checkpoints" / "epoch=0-step=3.ckpt"

    refused = fit(tmp_path, *MODEL, "--trainer.max_steps", "5", "--ckpt_path", str(folder))
    assert refused.returncode == 1, output(refused)[-3000:]
    line = refused.stderr.strip().splitlines()[-1]
    assert line.startswith("diffv2-lit fit: error: cannot resume from checkpoint") and "Traceback" not in refused.stderr
    assert "ModelParallelStrategy" in line and "consolidate --with-optimizer" in line
    assert "last.ckpt" not in line  # the old advice: another sharded folder

    command = line.split("`")[1]  # the fix as the message writes it
    merged = tmp_path / "merged.ckpt"
    converted = tool(tmp_path, *shlex.split(command.replace("merged.ckpt", str(merged)))[1:])
    assert converted.returncode == 0, output(converted)[-3000:]
    resumed = fit(tmp_path, *MODEL, "--trainer.max_steps", "6", "--ckpt_path", str(merged))
    assert resumed.returncode == 0, output(resumed)[-3000:]
    saved = sorted(p.name for p in (run_dir(tmp_path, 1) / "checkpoints").glob("epoch=*.ckpt"))
    assert saved == ["epoch=0-step=6.ckpt"], saved  # continued from step 3 (a fresh start would save step 3 too)
