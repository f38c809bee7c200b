"""`validate` and a resume of a finished run leave the run folders as they were and say what they did: no new
`version_<n>`, no `checkpoints:` path that is never written, no "resuming from" for a validation (issue 25.4)."""

import re
from pathlib import Path

import pytest

from tests.faults.forked import diffv2_lit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import TINY, output

RUNS = Path("runs") / "faults"
LAST = RUNS / "version_0" / "checkpoints" / "last.ckpt"


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.slow  # four runs one after the other
def test_validate_and_a_finished_resume_leave_no_new_folder(tmp_path):
    fitted = diffv2_lit(tmp_path, "fit", "--config", str(TINY), "--trainer.max_steps", "3")
    assert fitted.returncode == 0, output(fitted)[-3000:]
    before = _tree(tmp_path)

    validated = diffv2_lit(tmp_path, "validate", "--config", str(TINY), "--ckpt_path", "last",
                           "--trainer.limit_val_batches", "2")
    assert validated.returncode == 0, output(validated)[-3000:]
    assert f"validating {LAST} (step 3)" in validated.stdout.splitlines()
    assert "resuming" not in validated.stdout and "checkpoints:" not in validated.stdout
    # Lightning's table of the numbers is the report
    assert re.search(r"val/loss\s+│\s+\d+\.\d+", validated.stdout), validated.stdout

    explicit = diffv2_lit(tmp_path, "validate", "--config", str(TINY), "--ckpt_path", str(LAST))
    assert explicit.returncode == 0, output(explicit)[-3000:]
    assert f"validating {LAST} (step 3)" in explicit.stdout.splitlines()

    finished = diffv2_lit(tmp_path, "fit", "--config", str(TINY), "--trainer.max_steps", "3", "--ckpt_path", "last")
    assert finished.returncode == 0, output(finished)[-3000:]
    said = [line for line in finished.stdout.splitlines() if "step" in line or "checkpoints" in line]
    assert said == [f"{LAST} is at step 3 = trainer.max_steps: the run is finished; raise --trainer.max_steps to "
                    "train it further."]

    assert _tree(tmp_path) == before  # no version_1, no config.yaml in the working folder, nothing else
