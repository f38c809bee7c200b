"""A NaN in the forward pass of step 4 with GradientSpikeDetector in each mode."""

import json
import math

import torch

from diffv2_lit.checkpoint.safe_load import load_file
from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import output, run_dir, scalars

NAN_STEP = 4


def _run_with_nan(tmp_path, action: str, *extra: str, returncode: int = 0):
    record = tmp_path / "weights.json"
    result = fit(tmp_path, "--trainer.max_steps", "8",
                 "--trainer.callbacks+=diffv2_lit.callbacks.GradientSpikeDetector", f"--trainer.callbacks.action={action}",
                 "--trainer.callbacks+=tests.faults.inject.NaNAtStep", f"--trainer.callbacks.step={NAN_STEP}",
                 f"--trainer.callbacks.record={record}", *extra)
    assert result.returncode == returncode, output(result)[-3000:]
    spikes = [json.loads(line) for line in (run_dir(tmp_path, 0) / "spikes.jsonl").read_text().splitlines()]
    assert spikes[0]["step"] == NAN_STEP and spikes[0]["kind"] == "non_finite_loss" and spikes[0]["action"] == action
    sums = json.loads(record.read_text()) if record.exists() else {}
    return result, spikes, sums


def test_log_stops_before_the_nan_reaches_the_weights_naming_the_last_good_checkpoint(tmp_path):
    """The default action only records a spike; the module itself refuses to apply a non-finite update:
    one line naming the step and the last good checkpoint, exit 1, weights and every checkpoint finite."""
    result, _, sums = _run_with_nan(tmp_path, "log", returncode=1)
    checkpoints = run_dir(tmp_path, 0) / "checkpoints"
    error = result.stderr[result.stderr.index("diffv2-lit fit: error:"):].strip()
    assert len(error.splitlines()) == 1 and f"training diverged at step {NAN_STEP}" in error
    assert f"the last good checkpoint is {checkpoints.relative_to(tmp_path)}/" in error
    assert "Traceback" not in result.stderr
    assert sums["before"] == sums["after"]  # the NaN step's update was never applied
    saved = sorted(checkpoints.glob("*.ckpt"))
    assert saved and all(torch.isfinite(t).all() for path in saved for t in load_file(path)["state_dict"].values())
    assert max(scalars(run_dir(tmp_path, 0), "train/loss")) <= NAN_STEP  # nothing trained after it


def test_skip_leaves_the_weights_unchanged_and_logs_the_real_norm(tmp_path):
    _, spikes, sums = _run_with_nan(tmp_path, "skip")
    assert len(spikes) == 1 and sums["before"] == sums["after"]
    grad_norms = scalars(run_dir(tmp_path, 0), "train/grad_norm")
    assert math.isnan(grad_norms[NAN_STEP])  # the real value, not the 0 of the dropped gradients
    losses = scalars(run_dir(tmp_path, 0), "train/loss")
    assert sorted(losses) == list(range(8)) and all(math.isfinite(losses[s]) for s in range(NAN_STEP + 1, 8))


def test_stop_saves_a_checkpoint_and_a_resumed_run_continues(tmp_path):
    result, _, _ = _run_with_nan(tmp_path, "stop")
    checkpoint = run_dir(tmp_path, 0) / f"spike-stop-step{NAN_STEP:08d}.ckpt"
    assert f"saved {checkpoint.relative_to(tmp_path)}" in output(result) or str(checkpoint) in output(result)
    assert max(scalars(run_dir(tmp_path, 0), "train/loss")) == NAN_STEP
    saved = load_file(checkpoint)
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())

    resumed = fit(tmp_path, "--trainer.max_steps", "8", "--ckpt_path", str(checkpoint))
    assert resumed.returncode == 0, output(resumed)[-3000:]
    losses = scalars(run_dir(tmp_path, 1), "train/loss")
    assert sorted(losses) == list(range(saved["global_step"], 8)) and all(map(math.isfinite, losses.values()))
