"""Configuration mistakes end before any training work with one line naming the key (exit code 2)."""

import sys

import pytest

from tests.faults import forked
from tests.faults.helpers import TINY, fit

EXIT_USAGE = 2

CASES = {
    "unknown key": (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
    "wrong type": (["--trainer.max_steps", "many"], "trainer.max_steps: invalid value 'many' (expected int)"),
    "unknown attention variant": (["--model.architecture.attention", "diffv3"],
                                  "model.architecture.attention: 'diffv3' is not one of: baseline, diffv2, diffv1"),
    "unknown schedule": (["--model.schedule", "linear"], "model.schedule: 'linear' is not one of: cosine, wsd, constant"),
    "zero batch": (["--data.init_args.batch_size", "0"], "data.batch_size must be >= 1, got 0"),
    "missing tokenizer": (["--data", "diffv2_lit.data.datamodule.TokenDataModule", "--data.init_args.tokenizer",
                           "nope.json"], "tokenizer 'nope.json' not found"),
    "negative lr": (["--model.lr=-1e-3"], "model.lr=-0.001 must be > 0"),
    "zero lr": (["--model.lr", "0"], "model.lr=0.0 must be > 0"),
    "beta above 1": (["--model.betas", "[0.9, 1.5]"], "model.betas=[0.9, 1.5] must be two numbers in [0, 1)"),
    "warmup longer than the schedule": (["--model.max_steps", "10", "--model.warmup_steps", "20"],
                                        "model.warmup_steps=20 must be below model.max_steps=10"),
    "negative weight decay": (["--model.weight_decay=-0.1"], "model.weight_decay=-0.1 must be >= 0"),
    "negative activation checkpointing": (["--model.parallel.activation_checkpointing=-2"],
                                          "model.parallel.activation_checkpointing=-2 must be false, true (every block) or N >= 1"),
    "inconsistent heads": (["--model.architecture.n_kv_heads", "3"],
                           "model.architecture.n_heads, model.architecture.n_kv_heads: n_heads=2 is not a multiple of n_kv_heads=3"),
    "seq_len above max_seq_len": (["--data.init_args.seq_len", "100"],
                                  "data.seq_len=100 is above the model's max_seq_len=64 (model.architecture.max_seq_len)"),
    "indivisible global batch": (["--global_batch_size", "6"],
                                 "global_batch_size=6 is not a multiple of data.batch_size=4 x 1 device(s) = 4"),
    "global batch vs accumulation": (["--global_batch_size", "8", "--trainer.accumulate_grad_batches", "3"],
                                     "trainer.accumulate_grad_batches=3 disagrees with global_batch_size=8"),
    "bad callback argument": (["--trainer.callbacks+=diffv2_lit.callbacks.GradientSpikeDetector",
                               "--trainer.callbacks.action=explode"],
                              "GradientSpikeDetector: action='explode' is unknown; choose one of ('log', 'skip', 'stop')"),
}


@pytest.mark.parametrize("name", CASES)
def test_config_error(tmp_path, name, monkeypatch, capsys):
    """In-process (these end before any training; a process each would cost seconds of imports)."""
    from diffv2_lit.cli.fit import run_lightning_cli

    args, expected = CASES[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffv2-lit", "fit"])
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(TINY), *args])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USAGE
    error = stderr[stderr.index("diffv2-lit fit: error:"):].strip()
    assert expected in error and len(error.splitlines()) == 1, error  # one line, the last one (no traceback after it)
    assert not (tmp_path / "runs").exists()  # stopped before a logger folder or checkpoint was made


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n   devices: 1\n")
    result = fit(tmp_path, "--config", str(bad))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == (f"diffv2-lit fit: error: malformed YAML in {bad}, line 3, column 11: "
                                     "mapping values are not allowed here")


def test_a_repeated_key_is_refused_naming_both_lines(tmp_path):
    """A second `model:` block silently replaced the first (lr 1e-3 became 3e-3), issue 24.13."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("model:\n  lr: 1.0e-3\ntrainer:\n  max_steps: 3\nmodel:\n  warmup_steps: 1\n")
    result = forked.fit(tmp_path, "--config", str(twice))  # forked after the imports; the test above is a plain process
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == (f"diffv2-lit fit: error: {twice}: key 'model' appears twice in one mapping "
                                     "(lines 1 and 5); YAML would silently keep only the second: merge them into one")
    assert not (tmp_path / "runs").exists()
