"""End to end through the console script: `python -m diffv2_lit fit --config ...` in a subprocess,
then the TensorBoard event file is read back for the expected tags."""

import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffv2_lit.checkpoint.safe_load import load_file
from tests import zygote

ROOT = Path(__file__).parents[2]
TINY = Path(__file__).with_name("configs") / "tiny.yaml"
EXPECTED_SCALARS = {"train/loss", "train/grad_norm", "lr", "val/loss", "val/ppl",
                    "perf/tokens_per_sec", "perf/tokens_per_sec_per_device", "perf/peak_memory_gb"}


def _diffv2_lit(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1",
           "DIFFV2_LIT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run([sys.executable, "-m", "diffv2_lit", *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_fit_through_the_console_script_then_resume(tmp_path):
    result = _diffv2_lit(tmp_path, "fit", "--config", str(TINY), "--trainer.max_steps", "3",
                         "--model.max_steps", "6")
    run_dir = tmp_path / "runs" / "tiny" / "version_0"
    assert "logs and resolved config: runs/tiny/version_0" in result.stdout
    assert "checkpoints: runs/tiny/version_0/checkpoints" in result.stdout
    assert "---- sample after 3 steps" in result.stdout
    assert (run_dir / "config.yaml").is_file() and (run_dir / "checkpoints" / "last.ckpt").is_file()

    events = EventAccumulator(str(run_dir))
    events.Reload()
    assert EXPECTED_SCALARS <= set(events.Tags()["scalars"])
    assert "samples/text" in str(events.Tags()["tensors"])  # add_text lands in the text plugin's tensors
    assert [e.step for e in events.Scalars("train/loss")] == [0, 1, 2]

    # --ckpt_path last: a new version folder, continuing at step 3 up to the schedule's 6 steps.
    # (The console script is what the first run checks: the resume is forked after the imports, tests/zygote.py.)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
           "DIFFV2_LIT_CACHE": str(tmp_path / "cache")}
    resume = zygote.run(["fit", "--config", str(TINY), "--trainer.max_steps", "6", "--model.max_steps", "6",
                         "--ckpt_path", "last"], tmp_path, env)
    assert resume.returncode == 0, resume.stdout[-3000:] + resume.stderr[-3000:]
    resumed = EventAccumulator(str(tmp_path / "runs" / "tiny" / "version_1"))
    resumed.Reload()
    assert [e.step for e in resumed.Scalars("train/loss")] == [3, 4, 5]


def test_float32_matmul_precision_defaults_to_high_and_is_validated():
    import pytest

    from diffv2_lit.cli.fit import parse_config

    assert parse_config([str(TINY)]).float32_matmul_precision == "high"
    assert parse_config([str(TINY)], ["--float32_matmul_precision", "highest"]).float32_matmul_precision == "highest"
    with pytest.raises(SystemExit):
        parse_config([str(TINY)], ["--float32_matmul_precision", "fast"])


def test_a_run_shows_steps_loss_and_speed_and_nothing_else(tmp_path):
    """What a pretraining user wants on screen: where the logs go (before training), one bar in optimizer
    steps with loss and tokens/s, and none of the messages every run used to print."""
    result = _diffv2_lit(tmp_path, "fit", "--config", str(TINY), "--trainer.enable_progress_bar", "true",
                         "--trainer.max_steps", "5", "--model.max_steps", "6")
    screen = (result.stdout + result.stderr).replace("\r", "\n")
    assert screen.index("logs and resolved config: runs/tiny/version_0") < screen.index("train:")
    bar = [line for line in screen.splitlines() if line.startswith("train:")][-1]
    assert "5/5" in bar and "step/s" in bar and "loss=" in bar and "tok/s=" in bar
    for noise in ("Epoch 0/", "v_num", "litlogger", "LeafSpec", "`IterableDataset` has `__len__`"):
        assert noise not in screen, noise
