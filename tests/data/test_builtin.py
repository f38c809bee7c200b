"""The built-in corpus, prepared on first use inside `fit`: said in one line, and neutral to the run's seed."""

import os
import subprocess
from pathlib import Path

from tests import zygote
from tests.faults.helpers import scalars

ROOT = Path(__file__).parents[2]
# The quickstart recipe, one optimizer step, nothing else: what the first step's loss depends on is the seed's
# initialisation and the first batch.
ONE_STEP = ["--config", str(ROOT / "recipes" / "quickstart.yaml"), "--trainer.max_steps", "1",
            "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "0", "--trainer.callbacks=[]",
            "--trainer.enable_progress_bar", "false"]


def _fit(tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
           "DIFFV2_LIT_CACHE": str(tmp_path / "cache")}
    return zygote.run(["fit", *ONE_STEP], tmp_path, env, timeout=300)  # forked after the imports (tests/zygote.py)


def test_one_seed_gives_one_model_with_and_without_the_cache(tmp_path):
    """Issue 19.14: preparing the corpus on first use consumed the global RNG between the seed and the model's
    initialisation. Issue 25.7: that first use printed nothing while it took seconds."""
    cold = _fit(tmp_path)  # the cache does not exist yet: the first use prepares it
    assert cold.returncode == 0, cold.stderr[-3000:]
    warm = _fit(tmp_path)  # the same command again, the cache in place
    assert warm.returncode == 0, warm.stderr[-3000:]

    first_use = [line for line in cold.stdout.splitlines() if line.startswith("[data]")]
    target = tmp_path / "cache" / "data"
    assert len(first_use) == 1 and first_use[0].startswith(
        f"[data] first use of builtin:shakespeare: preparing it with tokenizer 'byte' into {target}/shakespeare-byte-")
    assert "[data]" not in warm.stdout

    runs = tmp_path / "runs" / "quickstart"
    cold_loss, warm_loss = (scalars(runs / f"version_{v}", "train/loss") for v in (0, 1))
    assert list(cold_loss) == [0] and cold_loss == warm_loss  # bit-identical: one initialisation
