"""Configuration mistakes end before any training work with one line naming the key (exit code 2)."""

import pytest

from tests.faults.helpers import fit

EXIT_USAGE = 2

CASES = {
    "unknown key": (["--trainer.max_stepz", "3"], "unrecognized arguments: --trainer.max_stepz 3"),
    "wrong type": (["--trainer.max_steps", "many"], 'Parser key "trainer.max_steps"'),
    "inconsistent heads": (["--model.model.n_kv_heads", "3"],
                           "model.model.n_heads, model.model.n_kv_heads: n_heads=2 is not a multiple of n_kv_heads=3"),
    "seq_len above max_seq_len": (["--data.init_args.seq_len", "100"],
                                  "data.seq_len=100 is above the model's max_seq_len=64 (model.model.max_seq_len)"),
    "indivisible global batch": (["--global_batch_size", "6"],
                                 "global_batch_size=6 is not a multiple of data.batch_size=4 x 1 device(s) = 4"),
    "global batch vs accumulation": (["--global_batch_size", "8", "--trainer.accumulate_grad_batches", "3"],
                                     "trainer.accumulate_grad_batches=3 disagrees with global_batch_size=8"),
    "bad callback argument": (["--trainer.callbacks+=diffv2_lit.callbacks.GradientSpikeDetector",
                               "--trainer.callbacks.action=explode"],
                              "GradientSpikeDetector: action='explode' is unknown; choose one of ('log', 'skip', 'stop')"),
}


@pytest.mark.parametrize("name", CASES)
def test_config_error(tmp_path, name):
    args, expected = CASES[name]
    result = fit(tmp_path, *args)
    assert result.returncode == EXIT_USAGE
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # stopped before a logger folder or checkpoint was made


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  max_steps: 3\n   devices: 1\n")
    result = fit(tmp_path, "--config", str(bad))
    assert result.returncode == EXIT_USAGE
    assert result.stderr.strip() == (f"diffv2-lit fit: error: malformed YAML in {bad}, line 3, column 11: "
                                     "mapping values are not allowed here")
