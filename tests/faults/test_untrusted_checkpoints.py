"""Issue 16: loading a checkpoint never runs code from it.

Crafted checkpoints (tamper.py: a real checkpoint plus one object that unpickles as
`os.system("touch <marker>")`) against every entry point (fit and validate as real `diffv2-lit` processes,
the tools generate, export and consolidate through the same `main` in this process): each one is
refused with one line naming `posix.system` and the opt-in, and the marker never appears. Every
checkpoint the project writes still loads, and the opt-in (DIFFV2_LIT_TRUST_CHECKPOINTS=1,
--trust-checkpoint) loads the crafted one, which the marker proves.
"""

import pickle
import shutil

import lightning as L
import pytest
import torch

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.checkpoint.reading import load_for_inference
from diffv2_lit.checkpoint.atomic_io import AtomicCheckpointIO
from diffv2_lit.training.module import DecoderLM
from diffv2_lit.checkpoint.safe_load import UntrustedCheckpointError, guard_restore, load_file, trusting, verify
from tests.faults.forked import diffv2_lit, fit  # real processes, forked after the imports (tests/zygote.py)
from tests.faults.helpers import TINY, output, run_dir, tool
from tests.faults.tamper import EVIL_GLOBAL, crafted_file, crafted_folder
from tests.training.helpers import tiny_data, tiny_module, tiny_trainer

TRUST_ENV = "DIFFV2_LIT_TRUST_CHECKPOINTS"
# The fault suite's model with the quickstart's vocabulary, so `generate` can use the byte tokenizer.
MODEL = ("--model.architecture.vocab_size", "320")
FSDP2 = ("trainer:\n  devices: 2\n  strategy:\n    class_path: lightning.pytorch.strategies.ModelParallelStrategy\n"
         "    init_args: {data_parallel_size: 2, tensor_parallel_size: 1}\n"
         "model:\n  parallel:\n    fsdp_param_dtype: null\n    fsdp_reduce_dtype: null\n")


def _entry_point_args(command: str, checkpoint, tmp_path) -> list[str]:
    return {
        "generate": ["generate", "--ckpt", str(checkpoint), "--prompt", "ROMEO:", "--max-new-tokens", "4",
                     "--tokenizer", "byte"],
        "export": ["export", "--ckpt", str(checkpoint), "--output", str(tmp_path / "exported")],
        "consolidate": ["consolidate", str(checkpoint), str(tmp_path / "merged.ckpt")],
        "validate": ["validate", "--config", str(TINY), *MODEL, "--ckpt_path", str(checkpoint)],
        "fit": ["fit", "--config", str(TINY), *MODEL, "--ckpt_path", str(checkpoint)],
        "init_from": ["fit", "--config", str(TINY), *MODEL, "--model.init_from", str(checkpoint),
                      "--trainer.max_steps", "1"],
    }[command]


def _assert_refused(result, checkpoint, marker, exit_code: int) -> None:
    """Nonzero exit, a last stderr line naming the checkpoint, the type and the opt-in, no traceback, no marker."""
    assert not marker.exists(), "the crafted checkpoint's code ran"
    assert result.returncode == exit_code, output(result)[-3000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("diffv2-lit ") and ": error: refusing to load " in line, line
    assert str(checkpoint) in line and EVIL_GLOBAL in line and f"{TRUST_ENV}=1" in line
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="session")
def single_file_run(tmp_path_factory):
    """A real run (`diffv2-lit fit`, one process, fp32): 3 steps, its `last.ckpt`."""
    tmp = tmp_path_factory.mktemp("single_file")
    result = fit(tmp, *MODEL, "--trainer.max_steps", "3")
    assert result.returncode == 0, output(result)[-3000:]
    return run_dir(tmp, 0) / "checkpoints" / "last.ckpt"


@pytest.fixture
def crafted_ckpt(single_file_run, tmp_path):
    """(crafted copy of the real run's last.ckpt, its marker path)."""
    marker = tmp_path / "PWNED"
    return crafted_file(single_file_run, tmp_path / "shared.ckpt", marker), marker


@pytest.fixture(scope="session")
def sharded_run(tmp_path_factory):
    """A real 2-process FSDP2 run (ModelParallelStrategy, gloo): 3 steps, its sharded checkpoint folder
    `epoch=0-step=3.ckpt`."""
    tmp = tmp_path_factory.mktemp("sharded")
    (tmp / "fsdp2.yaml").write_text(FSDP2)
    result = fit(tmp, "--config", str(tmp / "fsdp2.yaml"), *MODEL, "--trainer.max_steps", "3")
    assert result.returncode == 0, output(result)[-3000:]
    folder = run_dir(tmp, 0) / "checkpoints" / "epoch=0-step=3.ckpt"
    assert (folder / ".metadata").is_file() and (folder / "meta.pt").is_file()
    return {"dir": tmp, "folder": folder}


# ---- a crafted single-file checkpoint ---------------------------------------------------------------


@pytest.mark.parametrize("command, exit_code", [("generate", 1), ("export", 1), ("validate", 1), ("fit", 1),
                                                ("init_from", 1)])
def test_every_entry_point_refuses_a_crafted_checkpoint(crafted_ckpt, tmp_path, command, exit_code):
    checkpoint, marker = crafted_ckpt
    run = tool if command in ("generate", "export") else diffv2_lit  # the tools in-process; fit/validate as processes
    result = run(tmp_path, *_entry_point_args(command, checkpoint, tmp_path))
    _assert_refused(result, checkpoint, marker, exit_code)


def test_load_model_refuses_a_crafted_checkpoint(crafted_ckpt):
    checkpoint, marker = crafted_ckpt
    with pytest.raises(UntrustedCheckpointError, match=EVIL_GLOBAL):
        load_for_inference(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("guard", ["AtomicCheckpointIO", "guard_restore"])
def test_lightnings_restore_refuses_a_crafted_checkpoint(crafted_ckpt, tmp_path, monkeypatch, guard):
    """Lightning's own restore inside Trainer.fit, without the CLI's checks before it: through
    AtomicCheckpointIO, or any CheckpointIO under guard_restore, even with torch told to default to
    weights_only=False."""
    checkpoint, marker = crafted_ckpt
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    plugins = [AtomicCheckpointIO()] if guard == "AtomicCheckpointIO" else []
    trainer = tiny_trainer(max_steps=1, plugins=plugins, default_root_dir=tmp_path)
    if guard == "guard_restore":
        guard_restore(trainer.strategy)
    with pytest.raises(UntrustedCheckpointError, match=EVIL_GLOBAL):
        trainer.fit(tiny_module(), tiny_data(), ckpt_path=checkpoint)
    assert not marker.exists()


def test_weights_only_false_is_not_the_opt_in(crafted_ckpt, tmp_path):
    checkpoint, marker = crafted_ckpt
    result = diffv2_lit(tmp_path, *_entry_point_args("fit", checkpoint, tmp_path), "--weights_only", "false")
    assert result.returncode == 2 and not marker.exists()
    assert "--weights_only false: diffv2-lit loads checkpoints as data only" in result.stderr
    assert f"set {TRUST_ENV}=1 instead" in result.stderr


# ---- the opt-in ---------------------------------------------------------------------------------------


def test_the_environment_variable_loads_a_trusted_checkpoint(crafted_ckpt, tmp_path):
    checkpoint, marker = crafted_ckpt
    result = diffv2_lit(tmp_path, *_entry_point_args("generate", checkpoint, tmp_path), extra_env={TRUST_ENV: "1"})
    assert result.returncode == 0, result.stderr
    assert marker.exists() and result.stdout.startswith("ROMEO:")
    assert f"trusting {checkpoint}" in result.stderr and EVIL_GLOBAL in result.stderr


def test_the_flag_loads_a_trusted_checkpoint(crafted_ckpt, tmp_path):
    checkpoint, marker = crafted_ckpt
    result = tool(tmp_path, *_entry_point_args("export", checkpoint, tmp_path), "--trust-checkpoint")
    assert result.returncode == 0, result.stderr
    assert marker.exists() and (tmp_path / "exported" / "model.safetensors").is_file()


def test_resume_with_the_environment_variable(crafted_ckpt, tmp_path):
    checkpoint, marker = crafted_ckpt
    result = diffv2_lit(tmp_path, *_entry_point_args("fit", checkpoint, tmp_path), "--trainer.max_steps", "4",
                        "--model.max_steps", "12", extra_env={TRUST_ENV: "1"})
    assert result.returncode == 0, output(result)[-3000:]
    assert marker.exists()


def test_trusting_in_python(crafted_ckpt):
    checkpoint, marker = crafted_ckpt
    with trusting():
        model, config, _, _ = load_for_inference(checkpoint)
    assert marker.exists() and config.attention == "diffv2"


# ---- what the project writes still loads ------------------------------------------------------------


def test_every_checkpoint_of_a_real_run_and_its_export_load(baseline, single_file_run, tmp_path):
    """fp32 single files (every step and last.ckpt) load as data; an export of one generates."""
    checkpoints = sorted(baseline["checkpoints"].glob("*.ckpt"))
    assert len(checkpoints) >= 4
    for checkpoint in checkpoints:
        verify(checkpoint)
        load_for_inference(checkpoint)
    exported = tool(tmp_path, *_entry_point_args("export", single_file_run, tmp_path))
    assert exported.returncode == 0, exported.stderr
    load_for_inference(tmp_path / "exported")


# ---- sharded (FSDP2) folders --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("command", ["generate", "export", "consolidate", "init_from"])
def test_every_tool_refuses_a_sharded_folder_with_a_crafted_meta_pt(sharded_run, tmp_path, command):
    marker = tmp_path / "PWNED"
    folder = crafted_folder(sharded_run["folder"], tmp_path / "shared.ckpt", marker, "meta.pt")
    run = diffv2_lit if command == "init_from" else tool
    result = run(tmp_path, *_entry_point_args(command, folder, tmp_path))
    _assert_refused(result, folder / "meta.pt", marker, exit_code=1)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["index", "item"])
def test_consolidate_refuses_a_crafted_index_or_item(sharded_run, tmp_path, where):
    """torch reads `.metadata` with plain pickle and non-tensor items with weights_only=False. The crafted item
    is in the optimizer state, which consolidate reads only with --with-optimizer."""
    marker = tmp_path / "PWNED"
    folder = crafted_folder(sharded_run["folder"], tmp_path / "shared.ckpt", marker, where)
    with_optimizer = ["--with-optimizer"] if where == "item" else []
    result = tool(tmp_path, *_entry_point_args("consolidate", folder, tmp_path), *with_optimizer)
    _assert_refused(result, folder, marker, exit_code=1)
    assert not (tmp_path / "merged.ckpt").exists()

    with pytest.raises(UntrustedCheckpointError, match=EVIL_GLOBAL):
        verify(folder)
    assert not marker.exists()
    trusted = tool(tmp_path, *_entry_point_args("consolidate", folder, tmp_path), *with_optimizer, "--trust-checkpoint")
    assert trusted.returncode == 0, trusted.stderr
    assert marker.exists() and (tmp_path / "merged.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("where", ["meta.pt", "index"])
def test_load_model_refuses_a_crafted_sharded_folder(sharded_run, tmp_path, where):
    marker = tmp_path / "PWNED"
    folder = crafted_folder(sharded_run["folder"], tmp_path / "shared.ckpt", marker, where)
    with pytest.raises(UntrustedCheckpointError, match=EVIL_GLOBAL):
        load_for_inference(folder)
    assert not marker.exists()


@pytest.mark.slow
def test_fsdp2_resume_refuses_a_crafted_index_inside_lightnings_restore(sharded_run, tmp_path):
    """The folder's meta.pt is clean, so the checks before fit pass: the refusal comes from Lightning's own
    restore (ModelParallelStrategy -> torch.distributed.checkpoint), on both ranks."""
    marker = tmp_path / "PWNED"
    folder = crafted_folder(sharded_run["folder"], tmp_path / "shared.ckpt", marker, "index")
    (tmp_path / "fsdp2.yaml").write_text(FSDP2)
    result = diffv2_lit(tmp_path, "fit", "--config", str(TINY), "--config", str(tmp_path / "fsdp2.yaml"), *MODEL,
                        "--ckpt_path", str(folder), "--trainer.max_steps", "4")
    _assert_refused(result, folder / ".metadata", marker, exit_code=1)


@pytest.mark.slow
def test_fsdp2_resume_refuses_a_crafted_meta_pt_even_when_torch_is_told_otherwise(sharded_run, tmp_path):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 turns torch.load's default into weights_only=False; every load here
    passes weights_only=True explicitly, which that variable does not override."""
    marker = tmp_path / "PWNED"
    folder = crafted_folder(sharded_run["folder"], tmp_path / "shared.ckpt", marker, "meta.pt")
    (tmp_path / "fsdp2.yaml").write_text(FSDP2)
    result = diffv2_lit(tmp_path, "fit", "--config", str(TINY), "--config", str(tmp_path / "fsdp2.yaml"), *MODEL,
                        "--ckpt_path", str(folder), extra_env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"})
    _assert_refused(result, folder / "meta.pt", marker, exit_code=1)


@pytest.mark.slow
def test_the_projects_sharded_checkpoint_resumes_and_converts(sharded_run, tmp_path):
    folder = sharded_run["folder"]
    verify(folder)
    load_for_inference(folder)
    resumed = fit(sharded_run["dir"], "--config", str(sharded_run["dir"] / "fsdp2.yaml"), *MODEL, "--ckpt_path",
                  str(folder), "--trainer.max_steps", "4", "--model.max_steps", "12")
    assert resumed.returncode == 0, output(resumed)[-3000:]
    assert (run_dir(sharded_run["dir"], 1) / "checkpoints" / "last.ckpt" / "meta.pt").is_file()
    merged = tool(tmp_path, *_entry_point_args("consolidate", folder, tmp_path), "--with-optimizer")
    assert merged.returncode == 0, merged.stderr
    assert load_file(tmp_path / "merged.ckpt")["optimizer_states"][0]["param_groups"][0]["lr"] > 0
    load_for_inference(tmp_path / "merged.ckpt")
    shutil.rmtree(run_dir(sharded_run["dir"], 1))  # the fixture's folder stays as the fixture made it


def test_a_guarded_strategy_still_pickles():
    """ddp_spawn pickles the strategy for its worker processes; the guard must travel with it."""
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False)
    guard_restore(trainer.strategy)
    copy = pickle.loads(pickle.dumps(trainer.strategy))
    assert copy.load_checkpoint.strategy is copy


def test_path_arguments_are_saved_as_strings(tmp_path):
    """From Python, paths are often pathlib objects; the hyper-parameters a checkpoint stores stay data."""
    module = DecoderLM(architecture={"preset": "quickstart", "n_layers": 1}, init_from=tmp_path / "weights.ckpt")
    data = TokenDataModule(data_dir=tmp_path / "prepared", tokenizer="byte")
    torch.save({"hyper_parameters": dict(module.hparams), "datamodule_hyper_parameters": dict(data.hparams)},
               tmp_path / "hparams.ckpt")
    loaded = load_file(tmp_path / "hparams.ckpt")
    assert loaded["hyper_parameters"]["init_from"] == str(tmp_path / "weights.ckpt")
    assert loaded["datamodule_hyper_parameters"]["data_dir"] == str(tmp_path / "prepared")
