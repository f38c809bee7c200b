import pytest

from tests.faults.forked import fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import MAX_STEPS, run_dir, scalars


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    """One uninterrupted run for the whole suite: its per-step losses and its checkpoints."""
    tmp = tmp_path_factory.mktemp("baseline")
    result = fit(tmp)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    losses = scalars(run_dir(tmp, 0), "train/loss")
    assert sorted(losses) == list(range(MAX_STEPS))
    return {"dir": tmp, "losses": losses, "checkpoints": run_dir(tmp, 0) / "checkpoints"}
