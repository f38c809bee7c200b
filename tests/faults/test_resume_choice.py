"""What a resume continues (issues 24.4, 24.6, 19.4, 19.11, 19.12): `--ckpt_path last` takes the highest step of
this run whatever the file times, refuses another run's checkpoint naming the setting, and a resume with new
optimizer settings or a longer schedule applies them and says so in one line each."""

import math
import os
import shutil

import yaml

from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import output, run_dir, scalars

CHECKPOINTS = "runs/faults/version_0/checkpoints"


def test_last_takes_the_highest_step_not_the_newest_file(tmp_path):
    """After `cp -r` or a restore from backup, file times say nothing about training progress."""
    assert fit(tmp_path, "--trainer.max_steps", "6").returncode == 0  # step=3, step=6 and last (6)
    checkpoints = run_dir(tmp_path, 0) / "checkpoints"
    future = checkpoints.stat().st_mtime + 3600
    os.utime(checkpoints / "epoch=0-step=3.ckpt", (future, future))  # the older state, now the newest file
    resumed = fit(tmp_path, "--trainer.max_steps", "8", "--ckpt_path", "last")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert f"resuming from {CHECKPOINTS}/last.ckpt (step 6)" in resumed.stdout
    assert sorted(scalars(run_dir(tmp_path, 1), "train/loss")) == [6, 7]


def test_a_sweep_in_one_folder_is_not_continued_by_last_and_an_explicit_resume_applies_the_new_lr(tmp_path):
    assert fit(tmp_path, "--trainer.max_steps", "3").returncode == 0  # lr 3e-3 (tiny.yaml)
    sweep = fit(tmp_path, "--trainer.max_steps", "5", "--model.lr", "1e-3", "--ckpt_path", "last")
    assert sweep.returncode == 2, output(sweep)[-3000:]
    assert sweep.stderr.strip().splitlines()[-1] == (
        f"diffv2-lit fit: error: --ckpt_path last: the newest checkpoint of this model under "
        f"runs/faults/*/checkpoints, {CHECKPOINTS}/last.ckpt (step 3), was trained with other settings (model.lr: "
        f"checkpoint 0.003, this run 0.001). Resume it with its own settings, pass --ckpt_path "
        f"{CHECKPOINTS}/last.ckpt to continue it with this run's settings, or give this run a folder of its own "
        f"(--trainer.logger.init_args.name NAME).")
    assert sorted(os.listdir(tmp_path / "runs" / "faults")) == ["version_0"]  # nothing left behind

    resumed = fit(tmp_path, "--trainer.max_steps", "5", "--model.lr", "1e-3", "--ckpt_path", f"{CHECKPOINTS}/last.ckpt")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert "resuming at step 3 with model.lr 0.001 (the checkpoint's: 0.003)" in resumed.stdout
    # The checkpoint's schedule ended at step 3, where its cosine had reached 0.1 x 3e-3.
    assert "resuming at step 3 with an LR schedule of 5 steps (the checkpoint's: 3): the LR goes from 0.0003 to " \
           "0.000775" in resumed.stdout
    # This run's schedule, by hand: warm-up 2 steps, then cosine from 1e-3 to 1e-4 over steps 2..5.
    expected = {step: 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 2) / 3))) for step in (3, 4)}
    logged = scalars(run_dir(tmp_path, 1), "lr")
    assert {step: round(logged[step], 9) for step in (3, 4)} == {s: round(v, 9) for s, v in expected.items()}
    saved = yaml.safe_load((run_dir(tmp_path, 1) / "config.yaml").read_text())
    assert saved["model"]["lr"] == 1e-3  # the saved configuration is what ran


def test_a_max_steps_at_or_below_the_checkpoint_is_said(tmp_path):
    assert fit(tmp_path, "--trainer.max_steps", "3").returncode == 0
    last = f"{CHECKPOINTS}/last.ckpt"
    finished = fit(tmp_path, "--trainer.max_steps", "3", "--ckpt_path", last)
    assert finished.returncode == 0, output(finished)[-3000:]
    assert finished.stdout.strip().splitlines()[-1] == (
        f"{last} is at step 3 = trainer.max_steps: the run is finished; raise --trainer.max_steps to train it further.")
    below = fit(tmp_path, "--trainer.max_steps", "2", "--ckpt_path", "last")
    assert below.returncode == 2
    assert below.stderr.strip().splitlines()[-1] == (
        f"diffv2-lit fit: error: trainer.max_steps=2 is below the step of {last} (3): nothing would be trained; "
        "raise --trainer.max_steps above 3 to continue it.")
    deeper = fit(tmp_path, "--trainer.max_steps", "6", "--model.architecture.n_layers", "3", "--ckpt_path", "last")
    assert deeper.returncode == 2  # an edited recipe: before, a stdout note and training from step 0 (issue 24.11)
    assert deeper.stderr.strip().splitlines()[-1] == (
        f"diffv2-lit fit: error: --ckpt_path last: the newest checkpoint of this model under runs/faults/*/checkpoints, "
        f"{last} (step 3), was trained with other settings (model.architecture.n_layers: checkpoint 2, this run 3). "
        "Resume it with its own settings or give this run a folder of its own (--trainer.logger.init_args.name NAME).")
    assert sorted(os.listdir(tmp_path / "runs" / "faults")) == ["version_0"]


def test_a_resume_with_accumulation_does_not_save_again_at_its_first_micro_batch(tmp_path):
    """Before: step=3.ckpt and last.ckpt were rewritten after the first micro-batch of step 3, the loader one
    micro-batch ahead of the weights, so a later resume from them skipped those sequences."""
    accumulate = ("--trainer.accumulate_grad_batches", "2")
    assert fit(tmp_path, *accumulate, "--trainer.max_steps", "3").returncode == 0
    resumed = fit(tmp_path, *accumulate, "--trainer.max_steps", "4", "--ckpt_path", "last")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert sorted(os.listdir(run_dir(tmp_path, 1) / "checkpoints")) == ["last.ckpt"]  # saved at step 4 only
    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    assert fit(uninterrupted, *accumulate, "--trainer.max_steps", "4").returncode == 0
    assert scalars(run_dir(tmp_path, 1), "train/loss")[3] == scalars(run_dir(uninterrupted, 0), "train/loss")[3]


# ---- a sharded checkpoint written by two ranks: complete by its marker, never by file times (19.4) ------------


def test_sharded_completeness_ignores_clock_skew_and_names_a_missing_shard(tmp_path):
    from diffv2_lit.checkpoint.layout import checkpoint_problem, read_complete_marker
    from diffv2_lit.checkpoint.resume import candidates, choose_last
    from diffv2_lit.model import ModelConfig
    from tests.faults.test_untrusted_checkpoints import FSDP2, MODEL

    (tmp_path / "fsdp2.yaml").write_text(FSDP2)
    first = fit(tmp_path, "--config", str(tmp_path / "fsdp2.yaml"), *MODEL, "--trainer.max_steps", "3")
    assert first.returncode == 0, output(first)[-3000:]
    folder = run_dir(tmp_path, 0) / "checkpoints" / "last.ckpt"
    marker = read_complete_marker(folder)
    assert marker["global_step"] == 3
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "meta.pt"} <= set(marker["files"])
    assert marker["files"]["__1_0.distcp"] == (folder / "__1_0.distcp").stat().st_size

    # One node's clock 5 s ahead, the other's behind: the folder is as complete as it was.
    ahead, behind = folder.stat().st_mtime + 5, folder.stat().st_mtime - 5
    os.utime(folder / "__1_0.distcp", (ahead, ahead))
    os.utime(folder / "meta.pt", (behind, behind))
    assert checkpoint_problem(folder) is None
    config = ModelConfig(**yaml.safe_load((run_dir(tmp_path, 0) / "hparams.yaml").read_text())["model_config"])
    choice = choose_last(candidates([str(folder.parent)]), config, {}, {})
    assert (choice.path, choice.step, choice.incomplete) == (str(folder), 3, [])  # at one step, last.ckpt

    # A shard lost after the save: named, before any process starts.
    missing = tmp_path / "missing.ckpt"
    shutil.copytree(folder, missing)
    (missing / "__1_0.distcp").unlink()
    resumed = fit(tmp_path, "--config", str(tmp_path / "fsdp2.yaml"), *MODEL, "--trainer.max_steps", "4",
                  "--ckpt_path", str(missing))
    assert resumed.returncode == 1
    assert resumed.stderr.strip().splitlines()[-1].startswith(
        f"diffv2-lit fit: error: cannot resume from checkpoint {missing}: __1_0.distcp is missing (listed in "
        "complete.json: the folder was changed after its save).")
    assert "Traceback" not in resumed.stderr

    # Saves that never finished on every rank (no marker): `last` stops instead of starting from step 0.
    shutil.rmtree(missing)
    for checkpoint in folder.parent.iterdir():
        (checkpoint / "complete.json").unlink()
    stopped = fit(tmp_path, "--config", str(tmp_path / "fsdp2.yaml"), *MODEL, "--trainer.max_steps", "4",
                  "--ckpt_path", "last")
    assert stopped.returncode == 1, output(stopped)[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        "diffv2-lit fit: error: --ckpt_path last: every checkpoint under runs/faults/*/checkpoints is incomplete (2, "
        f"e.g. {CHECKPOINTS}/epoch=0-step=3.ckpt: the sharded folder has no valid complete.json")
    assert sorted(os.listdir(tmp_path / "runs" / "faults")) == ["version_0"]
