"""A resume continues one computation (issue 19.10): a checkpoint resumed with another rope_theta, norm_eps or
max_seq_len (same parameter shapes, another function of them) is refused like another shape, in one line
that names the field, both values and the flag that restores it."""

import pytest

from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)

EXIT_FAULT = 1


@pytest.mark.parametrize(("field", "trained", "changed"), [
    ("rope_theta", "10000.0", "500000.0"),
    ("norm_eps", "1e-05", "1e-06"),
    ("max_seq_len", "64", "128"),
])
def test_resume_refuses_another_computation(tmp_path, baseline, field, trained, changed):
    checkpoint = baseline["checkpoints"] / "epoch=0-step=6.ckpt"
    result = fit(tmp_path, "--ckpt_path", str(checkpoint), f"--model.architecture.{field}", changed)
    assert result.returncode == EXIT_FAULT, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"diffv2-lit fit: error: cannot resume from {checkpoint}: the checkpoint's model does not match this "
        f"run's: model.architecture.{field}: checkpoint {trained}, this run {changed}. Resume with the recipe the "
        f"checkpoint was trained with, or pass --model.architecture.{field} {trained}.")
    assert "Traceback" not in result.stderr
