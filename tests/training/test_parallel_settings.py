"""`model.parallel` (issue 21.5): the parallelism settings are one typed argument, `ParallelSettings`, given in
YAML as `model.parallel.<key>` and on the command line as `--model.parallel.<key>`; a mistake or an old flat key
ends in one line naming the key."""

import json
import sys
from pathlib import Path

import pytest

from diffv2_lit.checkpoint.resume import Recorded, differences
from diffv2_lit.checkpoint.safe_load import load_file
from diffv2_lit.errors import UsageError
from diffv2_lit.model import resolve_model_config
from diffv2_lit.training.parallel import MOVED_TO_PARALLEL, ParallelSettings
from tests import zygote
from tests.training.helpers import tiny_module

ROOT = Path(__file__).parents[2]
TINY = Path(__file__).with_name("configs") / "tiny.yaml"
EXIT_USAGE = 2


def test_a_recipe_with_grouped_keys_and_a_flag_fits_on_the_cpu(tmp_path):
    """YAML gives two keys of the group, a flag overrides one of them and leaves the other: the run trains with
    every 2nd block checkpointed (the flag's value, not the YAML's every block), syncs every micro-batch (the
    YAML's), and the checkpoint records the settings as a plain dict."""
    fragment = tmp_path / "parallel.yaml"
    fragment.write_text("model:\n  parallel:\n    activation_checkpointing: true\n"
                        "    fsdp_sync_every_micro_batch: true\n")
    probe = tmp_path / "probe.json"
    env = {"PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    result = zygote.run(["fit", "--config", str(TINY), "--config", str(fragment),
                         "--model.parallel.activation_checkpointing", "2", "--trainer.max_steps", "3",
                         "--trainer.callbacks+=tests.training.parallel_probe.RecordParallelism",
                         f"--trainer.callbacks.out={probe}"], tmp_path, env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    found = json.loads(probe.read_text())
    assert found["blocks"] == ["CheckpointWrapper", "Block"]  # blocks 0, 2, ... of 2 layers
    expected = {**{f: getattr(ParallelSettings(), f) for f in found["settings"]},
                "activation_checkpointing": 2, "fsdp_sync_every_micro_batch": True}
    assert found["settings"] == expected
    saved = load_file(tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    assert saved["hyper_parameters"]["parallel"] == expected and saved["global_step"] == 3
    assert not {"activation_checkpointing", "compile", "cpu_offload"} & set(saved["hyper_parameters"])


ERRORS = {
    "an old flat key on the command line": (["--model.cpu_offload", "true"],
                                            "model.cpu_offload is now model.parallel.cpu_offload"),
    "a misspelt key of the group": (["--model.parallel.cpu_ofload", "true"],
                                    "did you mean --model.parallel.cpu_offload?"),
    "a value the setting refuses": (["--model.parallel.activation_checkpointing=-1"],
                                    "model.parallel.activation_checkpointing=-1 must be false, true (every block) or "
                                    "N >= 1"),
    "a value outside the choices": (["--model.parallel.fsdp_reduce_dtype", "float16"],
                                    "model.parallel.fsdp_reduce_dtype: 'float16' is not one of: bfloat16, float32"),
}


@pytest.mark.parametrize("name", ERRORS)
def test_a_mistake_in_the_group_is_one_line_naming_the_key(tmp_path, name, monkeypatch, capsys):
    from diffv2_lit.cli.fit import run_lightning_cli

    args, expected = ERRORS[name]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffv2-lit", "fit"])
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(TINY), *args])
    stderr = capsys.readouterr().err
    error = stderr[stderr.index("diffv2-lit fit: error:"):].strip()
    assert exit_info.value.code == EXIT_USAGE
    assert expected in error and len(error.splitlines()) == 1, error
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("old", sorted(MOVED_TO_PARALLEL))
def test_every_old_flat_key_in_a_yaml_file_names_its_new_key(tmp_path, old, monkeypatch, capsys):
    """A config written before the grouping (a recipe, or an old run's config.yaml) says where each key went."""
    from diffv2_lit.cli.fit import run_lightning_cli

    key = old.split(".", 1)[1]
    old_config = tmp_path / "old.yaml"
    old_config.write_text(f"model:\n  {key}: null\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffv2-lit", "fit"])
    with pytest.raises(SystemExit) as exit_info:
        run_lightning_cli(["fit", "--config", str(TINY), "--config", str(old_config)])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == EXIT_USAGE
    assert f"model.{key} is now model.parallel.{key}" in stderr.strip().splitlines()[-1]


def test_from_python_a_dict_is_checked_like_the_yaml():
    module = tiny_module(parallel={"activation_checkpointing": 3, "cpu_offload": True})
    assert module.parallel == ParallelSettings(activation_checkpointing=3, cpu_offload=True)
    with pytest.raises(UsageError, match=r"^model\.parallel\.compile='yes' must be true or false\.$"):
        tiny_module(parallel={"compile": "yes"})
    with pytest.raises(UsageError, match=r"^model\.parallel\.cpu_ofload is not a parallelism setting"):
        tiny_module(parallel={"cpu_ofload": True})
    with pytest.raises(UsageError, match=r"fsdp_shard_size=0 must be null"):
        ParallelSettings(fsdp_shard_size=0)


def test_a_checkpoint_with_the_old_flat_keys_is_still_this_run_for_ckpt_path_last():
    """`--ckpt_path last` compares the settings that make a run (optimizer, schedule, data), not how it was
    parallelised: a checkpoint written with the flat keys, or other parallel settings, is still chosen."""
    now = dict(tiny_module(parallel={"compile": True}).hparams)
    config = resolve_model_config(now["model_config"])
    old = {key: value for key, value in now.items() if key != "parallel"}
    old.update(activation_checkpointing=True, compile=False, fsdp_param_dtype="bfloat16", cpu_offload=False)
    assert differences(Recorded("old.ckpt", 10, old, {}), config, now, {}) == []
    other_lr = Recorded("old.ckpt", 10, {**old, "lr": now["lr"] * 2}, {})  # a setting that does make a run
    assert differences(other_lr, config, now, {}) == [f"model.lr: checkpoint {now['lr'] * 2!r}, this run {now['lr']!r}"]
