"""Data changed under a run or between a run and its resume (issues 24.7, 24.12): one line each, naming the
last good checkpoint, never training on other data. Real `diffv2-lit fit` processes; the damage is done by a
callback (tests/data/damage.py) at step 7, as another shell would do it."""

import re

import pytest

from diffv2_lit.data.folder import open_folder
from diffv2_lit.data.prepare import prepare
from tests.data.conftest import diffv2_lit, make_docs, write_jsonl, write_run

PREPARE = dict(chunk_size=2048, val_fraction=0.1, num_workers=1, verbose=False, summary=False)  # ~40 chunks
LAST = "runs/data/version_0/checkpoints/last.ckpt"  # written at step 5


@pytest.fixture
def run_folder(tmp_path):
    prepare([str(write_jsonl(tmp_path / "a.jsonl", make_docs(400, seed=1)))], tmp_path / "data", **PREPARE)
    write_jsonl(tmp_path / "b.jsonl", make_docs(420, seed=2))
    write_run(tmp_path, max_steps=30)
    return tmp_path


def _damaged_at_step_7(tmp_path, action, workers):
    return diffv2_lit(tmp_path, "fit", "--trainer.callbacks+=tests.data.damage.DamageData",
                      "--trainer.callbacks.folder=data", "--trainer.callbacks.step=7",
                      f"--trainer.callbacks.action={action}", f"--trainer.callbacks.source={tmp_path / 'b.jsonl'}",
                      "--data.init_args.num_workers", str(workers))


def _error_line(result) -> str:
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


@pytest.mark.parametrize("action, workers, problem", [
    # LitData waited, then a 87-line ChunkWaitTimeoutError saying "not a missing object".
    ("delete", 2, "chunk file data/train/chunk-0-0.bin is missing (listed in index.json)"),
    # In place under a memory map: SIGBUS, exit 135, no message.
    ("truncate", 0, "chunk file data/train/chunk-0-0.bin is corrupt or truncated: 64 bytes on disk, index.json says "),
])
def test_chunks_damaged_under_a_running_fit(run_folder, action, workers, problem):
    line = _error_line(_damaged_at_step_7(run_folder, action, workers))
    assert re.fullmatch(rf"diffv2-lit fit: error: {re.escape(problem)}\d*; the data changed while this run read it "
                        rf"\(step \d+\)\. Restore the data and resume with --ckpt_path {re.escape(LAST)} \(the last good "
                        r"checkpoint\)\.", line), line


def test_data_prepared_again_under_a_running_fit(run_folder):
    """The fit once went on with the new data silently (validation loss 2.47 -> 6.91)."""
    line = _error_line(_damaged_at_step_7(run_folder, "reprepare", 0))
    assert line == (f"diffv2-lit fit: error: data folder data was prepared again (or changed) while this run read "
                    f"it: data/train/index.json is not the one the run started with; stopped at step 8 before "
                    f"training on other data. Restore the data and resume with --ckpt_path {LAST} (the last good "
                    f"checkpoint), or train on the new data from its weights with --model.init_from {LAST}.")


def test_resume_on_data_prepared_again_is_refused(run_folder):
    first = diffv2_lit(run_folder, "fit", "--trainer.max_steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    prepare([str(run_folder / "b.jsonl")], run_folder / "data", overwrite=True, **PREPARE)
    line = _error_line(diffv2_lit(run_folder, "fit", "--ckpt_path", LAST))
    assert line.startswith(f"diffv2-lit fit: error: data.data_dir data is not the data {LAST} was trained on "
                           "(prepared again or replaced since: then ")
    assert line.endswith(f"resume on the data it was trained on, or train on this data from its weights in a new "
                         f"run with --model.init_from {LAST}")


def test_the_fingerprint_is_the_data_not_when_it_was_made(tmp_path):
    """An identical re-prepare may be resumed on (same fingerprint); other text may not."""
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(100))
    prints = []
    for text in (src, src, write_jsonl(tmp_path / "b.jsonl", make_docs(100, seed=5))):
        prepare([str(text)], tmp_path / "data", overwrite=True, **PREPARE)
        prints.append(open_folder(tmp_path / "data").fingerprint())
    assert prints[0] == prints[1] != prints[2]
