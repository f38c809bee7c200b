"""Every benchmark script runs (tiny shapes, a few steps, nothing timed is asserted), so none rots
unnoticed: `bench_training.py` once failed on a renamed argument and nobody saw it."""

import os
from pathlib import Path

import pytest
from tests import zygote

ROOT = Path(__file__).parents[2]
BENCHMARKS = ROOT / "benchmarks"

# script -> (arguments for a tiny run, a line its output must contain)
SMOKE = {
    "bench_model.py": (["--preset", "quickstart", "--seq-len", "32", "--repeats", "1"], "## quickstart model"),
    "bench_training.py": (["--steps", "7", "--repeats", "1", "--seq-125m", "16", "--batch-125m", "1",
                           "--steps-125m", "2"], "DIFF V2 / baseline tokens/s"),
    "bench_decode.py": (["--shapes", "quickstart", "--batches", "1", "--prompt-len", "8", "--new-tokens", "4",
                         "--reps", "1"], "| quickstart | 1 | 4 | diffv2 |"),
    "bench_monitor.py": (["--presets", "quickstart", "--seq-len", "32", "--batch-size", "1", "--repeats", "1"],
                         "quickstart"),
    "bench_data.py": (["--corpus", "{corpus}", "--seq-len", "32", "--batch-size", "2", "--bpe-vocab", "300",
                       "--stream-batches", "5"], "streaming vs training step"),
    "bench_async_save.py": (["--preset", "quickstart", "--repeats", "1"], "stall ratio background / synchronous"),
    "bench_subtraction.py": (["--preset", "quickstart", "--seq-len", "32", "--repeats", "1"], "| cancel | fp32 |"),
    "bench_document_mask.py": (["--presets", "quickstart", "--seq-len", "32", "--batch-size", "1", "--repeats", "1",
                                "--doc-len", "8"], "| quickstart 1x32 | diffv1 |"),
    "bench_muon.py": (["--dim", "128", "--layers", "1", "--steps", "2"], "Muon / AdamW step"),
    "study.py": (["--arms", "diffv2", "--optimizers", "muon", "--stress-arms", "--seeds", "1", "--steps", "2",
                  "--dry-run"], "fit"),
}
COVERED_ELSEWHERE = {"gpu_suite.py": "tests/benchmarks/test_gpu_suite.py runs its --dry mode",
                     "sync_count.py": "a callback, not a script: the GPU suite's --dry training row runs it"}


def test_every_benchmark_script_has_a_smoke_run():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    assert scripts == set(SMOKE) | set(COVERED_ELSEWHERE)


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_script_runs(script, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "verse.txt").write_text("Shall I compare thee to a summer's day?\n" * 2000)
    args, expected = SMOKE[script]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
           "DIFFV2_LIT_CACHE": str(tmp_path / "cache")}
    result = zygote.run([a.format(corpus=corpus) for a in args], tmp_path, env, timeout=300,
                        script=BENCHMARKS / script)  # forked after the imports (tests/zygote.py)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert expected in result.stdout
