"""A disk that fills up during a checkpoint save (issue 24.5): one line naming the device, what was needed and the
last complete checkpoint, which is intact. A real fit whose run folder is on a 1.5 MiB tmpfs (checkpoints of
the fault suite's model are about 0.4 MB: step=3 and last.ckpt fit, the save at step 6 does not)."""

import os
import subprocess

from diffv2_lit.checkpoint.layout import checkpoint_problem
from diffv2_lit.checkpoint.safe_load import load_file
from tests.faults.helpers import env, fit_args


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    assert os.geteuid() == 0, "this test mounts a tmpfs: run it as root (CI and the dev machine are)"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(small)], check=True)
    try:
        result = subprocess.run(fit_args("--trainer.logger.init_args.save_dir", "small/runs"), cwd=tmp_path,
                                env=env(tmp_path), capture_output=True, text=True, timeout=300)
        checkpoints = small / "runs" / "faults" / "version_0" / "checkpoints"
        held = sorted(os.listdir(checkpoints))
        steps = {name: load_file(checkpoints / name)["global_step"] for name in held}
        problems = {name: checkpoint_problem(checkpoints / name) for name in held}
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    # At step 6, step=6.ckpt fitted and the new last.ckpt did not: the old one (step 3) is untouched.
    folder = "small/runs/faults/version_0/checkpoints"
    assert last_line.startswith(f"diffv2-lit fit: error: no space left on {small} (tmpfs) to save checkpoint "
                                f"{folder}/last.ckpt: it needs about 0.4 MiB and "), last_line
    assert last_line.endswith(
        f"MiB are free; nothing was overwritten. The last complete checkpoint, {folder}/epoch=0-step=6.ckpt (step 6), "
        f"is intact: free space (or set ModelCheckpoint's dirpath on another disk) and resume with --ckpt_path "
        f"{folder}/epoch=0-step=6.ckpt."), last_line
    assert "Traceback" not in result.stderr and "unexpected pos" not in result.stderr
    assert set(problems.values()) == {None}  # every file left there is complete
    assert steps == {"epoch=0-step=3.ckpt": 3, "epoch=0-step=6.ckpt": 6, "last.ckpt": 3}
    assert not [name for name in held if ".partial-" in name]


def test_a_cache_too_small_for_the_builtin_corpus_is_one_line(tmp_path):
    """Before: 52 lines of traceback ending in prepare's advice to choose another --output, which fit has not got."""
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], check=True)
    try:
        result = subprocess.run(fit_args("--data", "diffv2_lit.data.datamodule.TokenDataModule",
                                         "--model.architecture.vocab_size", "320", "--trainer.max_steps", "2"),
                                cwd=tmp_path, env={**env(tmp_path), "DIFFV2_LIT_CACHE": str(small)},
                                capture_output=True, text=True, timeout=300)
        held = os.listdir(small)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=True)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("diffv2-lit fit: error: the cache cannot hold the built-in corpus builtin:shakespeare: "
                                f"not enough space for {small}/data/shakespeare-byte-"), last_line
    assert last_line.endswith("MiB free: free space there, or set DIFFV2_LIT_CACHE to a folder on a larger disk")
    assert not [name for name in held if "partial" in name]
