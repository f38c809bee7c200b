"""`diffv2-lit fit|validate`: LightningCLI over `DecoderLM` and any LightningDataModule.

    diffv2-lit fit --config recipes/quickstart.yaml
    diffv2-lit fit --config recipes/125m-diffv2.yaml --config configs/hardware/multinode.yaml \
        --trainer.max_steps 100
    diffv2-lit fit --config recipes/quickstart.yaml --ckpt_path last        # resume
    diffv2-lit fit --config recipes/quickstart.yaml --print_config           # resolved YAML

`--config` may be repeated (later files override earlier ones), dotted flags override both, and
the resolved config is saved as config.yaml in every run's log folder.
"""

from __future__ import annotations

import glob
import os
import sys
import warnings

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_only

from diffv2_lit.training.module import DecoderLM

# TensorBoard by default; each run gets its own runs/<name>/version_<n> folder, and checkpoints go
# to its checkpoints/ subfolder (ModelCheckpoint's default dirpath).
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "diffv2-lit"},
    },
}


DEFAULT_DATA_MODULE = "diffv2_lit.data.datamodule.TokenDataModule"


class DiffV2CLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # One seed for the whole run unless the user says otherwise (reproducible by default).
        parser.set_defaults({"seed_everything": 1234})
        # Without a `data:` section, train on the built-in corpus (TokenDataModule's own defaults).
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA_MODULE}})

    def before_fit(self) -> None:
        self._resolve_last("fit")

    def before_validate(self) -> None:
        self._resolve_last("validate")

    def _resolve_last(self, subcommand: str) -> None:
        """`--ckpt_path last` across runs: every run logs into a new version folder, and Lightning
        would look for `last.ckpt` only in the new (empty) one. Take the newest of all versions."""
        if self.config_init[subcommand].get("ckpt_path") != "last":
            return
        found = find_last_checkpoint(self.trainer)
        if found:
            self.config_init[subcommand]["ckpt_path"] = found
            _print_rank_zero(f"resuming from {found}")


class _ParseOnlyCLI(DiffV2CLI):
    """Parses and validates a config (types, class paths, values) without building anything:
    lets tests and `--print_config`-style checks read GPU recipes on a CPU machine."""

    def instantiate_classes(self) -> None:
        pass


def build_cli(argv: list[str] | None, run: bool = True, cli_class: type[LightningCLI] = DiffV2CLI) -> LightningCLI:
    return cli_class(
        DecoderLM,
        L.LightningDataModule,
        subclass_mode_data=True,
        # The optimizer needs the (possibly FSDP-sharded) parameters: DecoderLM builds it itself.
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        args=argv,
        run=run,
    )


def parse_config(config_files: list[str], overrides: list[str] | None = None):
    """The resolved config (a jsonargparse Namespace) of `--config f1 --config f2 ... overrides`."""
    argv = [arg for path in config_files for arg in ("--config", path)] + list(overrides or [])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*args parameter is intended")  # called from Python on purpose
        return build_cli(argv, run=False, cli_class=_ParseOnlyCLI).config


def run_lightning_cli(argv: list[str] | None = None) -> LightningCLI:
    """Entry point of `diffv2-lit fit|validate` (argv starts with the subcommand)."""
    os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
    # LightningCLI warns when given args that also sit in sys.argv (the console-script case).
    cli = build_cli(None if argv is None or list(argv) == sys.argv[1:] else argv)
    _report_outputs(cli.trainer)
    return cli


def find_last_checkpoint(trainer: L.Trainer) -> str | None:
    """Newest `last*.ckpt` (file or sharded folder) under any version of this run's logger folder,
    or in a ModelCheckpoint's fixed dirpath."""
    patterns = []
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None):
            patterns.append(os.path.join(callback.dirpath, "last*.ckpt"))
    logger = trainer.logger
    if logger is not None and logger.save_dir is not None:
        patterns.append(os.path.join(logger.save_dir, str(logger.name), "*", "checkpoints", "last*.ckpt"))
    candidates = [path for pattern in patterns for path in glob.glob(pattern)]
    return max(candidates, key=os.path.getmtime) if candidates else None


@rank_zero_only
def _print_rank_zero(message: str) -> None:
    print(message)


@rank_zero_only
def _report_outputs(trainer: L.Trainer) -> None:
    """Say where the TensorBoard logs, the resolved config and the checkpoints went."""
    lines = []
    if trainer.logger is not None and trainer.log_dir:
        lines.append(f"logs and resolved config: {trainer.log_dir}  (tensorboard --logdir {trainer.log_dir})")
    callback = trainer.checkpoint_callback
    if callback is not None and callback.dirpath:
        lines.append(f"checkpoints: {callback.dirpath}" + (f"  (last: {callback.last_model_path})"
                                                           if callback.last_model_path else ""))
    for line in lines:
        print(line)
