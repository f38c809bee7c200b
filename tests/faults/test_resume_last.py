"""`--ckpt_path last` when twins share a log folder: it resumes this model's newest checkpoint, and says
plainly when there is none (naming the other model's checkpoints it set aside)."""

from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import output, run_dir, scalars

BASELINE = ["--model.architecture.attention", "baseline"]


def test_last_resumes_this_models_run_not_the_newer_twin(tmp_path):
    assert fit(tmp_path, "--trainer.max_steps", "3").returncode == 0             # version_0: DIFF V2
    assert fit(tmp_path, "--trainer.max_steps", "6", *BASELINE).returncode == 0  # version_1: its twin, newer
    resumed = fit(tmp_path, "--trainer.max_steps", "5", "--ckpt_path", "last")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert "resuming from runs/faults/version_0/checkpoints/" in resumed.stdout
    assert sorted(scalars(run_dir(tmp_path, 2), "train/loss")) == [3, 4]  # continued DIFF V2 from step 3


def test_last_with_only_another_models_checkpoints_says_so_and_starts_at_step_0(tmp_path):
    assert fit(tmp_path, "--trainer.max_steps", "3", *BASELINE).returncode == 0  # step=3.ckpt and last.ckpt
    started = fit(tmp_path, "--trainer.max_steps", "2", "--ckpt_path", "last")
    assert started.returncode == 0, output(started)[-3000:]
    assert ("--ckpt_path last: no checkpoint of this model under runs/faults/*/checkpoints; 2 checkpoint(s) there "
            "belong to another model (e.g. runs/faults/version_0/checkpoints/") in started.stdout
    assert "attention 'baseline', this run 'diffv2'" in started.stdout and "starting from step 0." in started.stdout
    assert "no last checkpoint available" not in output(started)  # Lightning's own, vaguer warning
    assert sorted(scalars(run_dir(tmp_path, 1), "train/loss")) == [0, 1]


def test_a_run_that_fails_at_once_leaves_no_empty_folder_behind(tmp_path):
    """Empty version folders of failed runs used to pile up in `compare` and `--ckpt_path last`."""
    failed = fit(tmp_path, "--data", "diffv2_lit.data.datamodule.TokenDataModule", "--model.architecture.vocab_size",
                 "320", "--data.init_args.data_dir", str(tmp_path / "missing"))
    assert failed.returncode == 1 and "does not exist" in failed.stderr
    assert "removed runs/faults/version_0: the run failed before logging anything" in failed.stderr
    assert not (tmp_path / "runs" / "faults" / "version_0").exists()
