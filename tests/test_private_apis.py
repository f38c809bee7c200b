"""Canaries for the private names of other libraries that diffv2-lit relies on (docs/architecture.md lists
them): each fails with the symbol and the installed version when an upgrade removes or changes it."""

import importlib
import inspect

import jsonargparse
import lightning
import litdata
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop


def _present(module_name: str, attribute: str, package, user: str) -> object:
    """`module.attribute`, or a failure naming it, the installed version and the file that relies on it."""
    try:
        value = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        pytest.fail(f"{package.__name__} {package.__version__}: {module_name}.{attribute} is gone ({error}); "
                    f"update {user}")
    return value


@pytest.mark.parametrize("module_name, attribute, user", [
    # what torch pickles into a sharded checkpoint's .metadata: the allow-list must name it
    ("torch.distributed.checkpoint.metadata", "_MEM_FORMAT_ENCODING", "dcp_metadata_globals in checkpoint/safe_load.py"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo", "dcp_metadata_globals in checkpoint/safe_load.py"),
    ("torch.serialization", "_get_layout", "dcp_metadata_globals in checkpoint/safe_load.py"),
    # FSDP2 activation checkpointing: torch's only path to checkpoint_wrapper (torchtitan imports it too)
    ("torch.distributed.algorithms._checkpoint.checkpoint_wrapper", "checkpoint_wrapper", "training/parallel.py"),
    ("torch._dynamo", "mark_static_address", "model/generation.py (static KV cache under compile)"),
    ("torch", "_foreach_mul_", "gradients.py (one fused clip of all gradients)"),
    ("torch.utils._python_dispatch", "TorchDispatchMode", "benchmarks/sync_count.py"),
])
def test_torch_private_names(module_name, attribute, user):
    assert callable(_present(module_name, attribute, torch, user)) or attribute == "_MEM_FORMAT_ENCODING"


def test_torch_sharded_metadata_pickles_only_allowed_names(tmp_path):
    """A real sharded save's .metadata reads with the allow-list: a torch that pickles another class there
    would make every sharded checkpoint look damaged."""
    import torch.distributed.checkpoint as dcp

    from diffv2_lit.checkpoint.safe_load import load_sharded, read_dcp_metadata

    state = {"state_dict": {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(2, dtype=torch.bfloat16)},
             "optimizer": {"param_groups": [{"lr": 0.1, "params": [0, 1]}]}}
    dcp.save(state, checkpoint_id=tmp_path, no_dist=True)
    try:
        read_dcp_metadata(tmp_path / ".metadata")
    except Exception as error:  # noqa: BLE001
        pytest.fail(f"torch {torch.__version__}: a sharded checkpoint's .metadata no longer reads with the "
                    f"allow-list ({error}); update dcp_metadata_globals in checkpoint/safe_load.py")
    loaded = load_sharded(tmp_path)
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert loaded["state_dict"]["b"].dtype == torch.bfloat16 and loaded["optimizer"] == state["optimizer"]
    assert set(load_sharded(tmp_path, keys={"optimizer"})) == {"optimizer"}


def test_lightning_cli_still_parses_ckpt_path_hyperparameters_in_one_method():
    """cli/fit.py overrides LightningCLI._parse_ckpt_path so that `--ckpt_path` never replaces the user's
    config with the checkpoint's hyper-parameters; a renamed method would silently bring that back."""
    from lightning.pytorch.cli import LightningCLI

    assert "self._parse_ckpt_path()" in inspect.getsource(LightningCLI.__init__), (
        f"lightning {lightning.__version__}: LightningCLI no longer calls _parse_ckpt_path; check how it reads "
        "--ckpt_path's hyper-parameters and update DiffV2CLI._parse_ckpt_path in cli/fit.py")


def test_lightning_cluster_environment_of_the_trainer():
    """callbacks/preemption.py reads the Trainer's cluster environment (a user's SLURMEnvironment plugin
    included) even under a single-device strategy, which has no public `cluster_environment`."""
    trainer = lightning.Trainer(accelerator="cpu", devices=1, logger=False)
    connector = getattr(trainer, "_accelerator_connector", None)
    assert connector is not None and hasattr(connector, "cluster_environment"), (
        f"lightning {lightning.__version__}: Trainer._accelerator_connector.cluster_environment changed; update "
        "_is_requeue_signal in callbacks/preemption.py")


def test_lightning_fsdp1_activation_checkpointing_setup():
    """training/cpu_twin.py (FSDP1 on CPU processes, for tests and benchmarks) repeats FSDPStrategy._setup_model
    with a CPU device and calls Lightning's own activation-checkpointing setup."""
    from lightning.pytorch.strategies import FSDPStrategy

    _present("lightning.pytorch.strategies.fsdp", "_setup_activation_checkpointing", lightning, "training/cpu_twin.py")
    assert "FullyShardedDataParallel(" in inspect.getsource(FSDPStrategy._setup_model), (
        f"lightning {lightning.__version__}: FSDPStrategy._setup_model changed; update CPUFSDPStrategy in "
        "training/cpu_twin.py")


def test_litdata_obstore_client_options():
    """data/remote.py adds allow_http to the client options LitData gives every obstore S3Store."""
    from litdata.streaming import downloader

    options = _present("litdata.streaming.downloader", "_OBSTORE_CLIENT_OPTIONS", litdata, "data/remote.py")
    assert isinstance(options, dict) and "client_options=_OBSTORE_CLIENT_OPTIONS" in inspect.getsource(downloader), (
        f"litdata {litdata.__version__}: obstore's client options are built elsewhere now; update "
        "allow_plain_http_endpoints in data/remote.py (S3-compatible servers on http://)")


def test_jsonargparse_messages_that_cli_usage_reads():
    """cli/usage.py turns jsonargparse's errors into one line by reading their text (no structured error)."""
    from diffv2_lit.cli import usage
    from diffv2_lit.data.datamodule import TokenDataModule

    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--data", type=TokenDataModule | None)
    with pytest.raises(jsonargparse.ArgumentError) as caught:
        parser.parse_args(["--data=diffv2_lit.data.datamodule.TokenDataModule", "--data.tokeniser=x"])
    line = usage._unknown_nested_key(str(caught.value), ["--data.tokeniser=x"])
    assert line is not None and "did you mean 'tokenizer'" in line, (
        f"jsonargparse {jsonargparse.__version__}: the unknown-key message changed:\n{caught.value}\nupdate "
        "_unknown_nested_key in cli/usage.py")


def test_lightning_per_batch_sigterm_broadcast():
    """callbacks/preemption.py switches it off once PreemptionCheckpoint owns SIGTERM."""
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None)), (
        f"lightning {lightning.__version__}: _TrainingEpochLoop._broadcast_sigterm_tensor is gone; check whether "
        "Lightning still broadcasts its SIGTERM flag before every batch and update callbacks/preemption.py")


def test_lightning_model_checkpoint_last_saved_step():
    """callbacks/resume.py sets it to the resumed step (Lightning does not checkpoint it)."""
    callback = ModelCheckpoint(every_n_train_steps=3)
    assert getattr(callback, "_last_global_step_saved", None) == 0 and "_last_global_step_saved" not in \
        callback.state_dict(), (
        f"lightning {lightning.__version__}: ModelCheckpoint._last_global_step_saved changed; check whether a resumed "
        "run still saves again at its first micro-batch and update callbacks/resume.py")


def test_lightning_model_parallel_save_distributed_checkpoint_flag():
    """checkpoint/atomic_io.py reads it to write sharded saves in the background as Lightning would."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    for flag in (True, False):
        strategy = ModelParallelStrategy(save_distributed_checkpoint=flag)
        assert getattr(strategy, "_save_distributed_checkpoint", None) is flag, (
            f"lightning {lightning.__version__}: ModelParallelStrategy._save_distributed_checkpoint changed; update "
            "MarkShardedSaves._writes_sharded in checkpoint/atomic_io.py")


def test_fsdp2_sync_decision_matches_lightnings_accumulation():
    """training/module.py decides when FSDP2 reduce-scatters from public loop state; Lightning's own private
    `_TrainingEpochLoop._should_accumulate` is the reference. 7 micro-batches per epoch, 3 per step: steps
    after micro-batches 3, 6 and (the epoch's tail) 7, in every epoch."""
    from tests.training.helpers import tiny_data, tiny_module, tiny_trainer

    class Record(lightning.pytorch.Callback):
        def __init__(self):
            self.ours, self.lightnings = [], []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.ours.append(pl_module._steps_after(batch_idx))
            self.lightnings.append(not trainer.fit_loop._should_accumulate())

    record = Record()
    trainer = tiny_trainer(max_steps=6, callbacks=[record], accumulate_grad_batches=3, limit_train_batches=7)
    trainer.fit(tiny_module(), tiny_data())
    epoch = [False, False, True, False, False, True, True]
    assert record.lightnings == epoch * 2, (
        f"lightning {lightning.__version__}: the fit loop's accumulation changed; update DecoderLM._steps_after "
        "in training/module.py (FSDP2's set_requires_gradient_sync)")
    assert record.ours == record.lightnings


def test_the_list_is_complete():
    """Every private name of another library used in diffv2_lit/ or benchmarks/ appears in docs/architecture.md's
    list, and every name on the list still occurs in the code: `x._name` or `import _name` where `_name` is not
    one of the project's own (defined or aliased in the project; overridden private methods are listed by
    hand)."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    sources = {path: path.read_text() for folder in ("diffv2_lit", "benchmarks") for path in (root / folder).rglob("*.py")}
    own = set()  # the project's private names: defined here, or imported under a private alias
    for text in sources.values():
        own |= set(re.findall(r"(?:def|class)\s+(_\w+)", text))
        own |= set(re.findall(r"^\s*(_\w+)\s*[:=]", text, re.M)) | set(re.findall(r"self\.(_\w+)\s*=", text))
        own |= set(re.findall(r"\bas\s+(_\w+)", text))
    used = {}
    for path, text in sources.items():
        code = "\n".join(line.split("#", 1)[0] for line in text.splitlines() if not line.lstrip().startswith(("#", '"', "-")))
        for name in re.findall(r"(?<![\w])(?!self\.|cls\.)\w+\.(_[A-Za-z]\w*)", code) + \
                re.findall(r"from [\w.]+ import \(?([^)\n]+)", code):
            for part in re.findall(r"\b_[A-Za-z]\w*", name):
                if part not in own and not part.startswith("__"):
                    used.setdefault(part, set()).add(str(path.relative_to(root)))
    listed = (root / "docs" / "architecture.md").read_text().split("## Private names of other libraries", 1)[1]
    table = listed.split("Replaced by public APIs", 1)[0]
    missing = {name: where for name, where in used.items() if name not in table}
    assert not missing, f"private names used but not listed in docs/architecture.md: {missing}"
    everything = "\n".join(sources.values())
    stale = [name for name in re.findall(r"`[^`]*?\b(_[A-Za-z]\w*)`", table) if not re.search(rf"\b{name}\b", everything)]
    assert not stale, f"listed in docs/architecture.md but no longer used: {stale}"
