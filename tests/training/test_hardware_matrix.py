"""Every hardware fragment in configs/hardware/ trains the quickstart recipe on the CPU (issue 11).

Each fragment is turned into its CPU twin: accelerator cpu, one device on one node, pure data
parallelism of size 1, and FSDP1's strategy class swapped for a CPU-eligible subclass (same settings).
Everything else stays as the fragment has it: strategy, precision plugin, FSDP policies. The run uses
fused AdamW (the CUDA default) and a clip value small enough that every step is clipped, with
validation and the end-of-fit sample (KV-cache generation under the fragment's precision), then the
TensorBoard events are read back for a finite loss.
"""

import math
import os
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffv2_lit.training.cpu_twin import single_device_fragment  # the same twins the GPU suite runs on CUDA
from tests import zygote

ROOT = Path(__file__).parents[2]
FRAGMENTS = sorted((ROOT / "configs" / "hardware").glob("*.yaml"))
def test_every_fragment_is_in_the_matrix():
    names = {f.stem for f in FRAGMENTS}
    assert {"cpu", "1gpu", "8gpu-ddp", "8gpu-fsdp1", "8gpu-fsdp2", "multinode"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("fragment", FRAGMENTS, ids=[f.stem for f in FRAGMENTS])
def test_fragment_trains_the_quickstart_with_clipping(tmp_path, fragment, builtin_cache):
    twin = single_device_fragment(fragment, "cpu", tmp_path / f"{fragment.stem}-cpu.yaml")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
           "DIFFV2_LIT_CACHE": str(builtin_cache)}  # the corpus prepared once (tests/conftest.py)
    args = ["fit", "--config", str(ROOT / "recipes" / "quickstart.yaml"), "--config", str(twin),
            "--trainer.max_steps", "4", "--trainer.log_every_n_steps", "1", "--trainer.gradient_clip_val", "0.01", "--model.fused_adamw", "true",
            "--trainer.val_check_interval", "2", "--trainer.limit_val_batches", "2",
            "--trainer.callbacks.max_new_tokens", "24", "--data.init_args.batch_size", "4"]  # small: seconds a step
    result = zygote.run(args, tmp_path, env, timeout=300)  # a real process, forked after the imports
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "---- sample after 4 steps" in result.stdout

    events = EventAccumulator(str(tmp_path / "runs" / "quickstart" / "version_0"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert all(math.isfinite(e.value) for e in events.Scalars("val/loss"))
    assert all(e.value > 0.01 for e in events.Scalars("train/grad_norm"))  # so every step was clipped
