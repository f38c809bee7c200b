"""`diffv2-lit fit|validate`: LightningCLI over `DecoderLM` and any LightningDataModule.

    diffv2-lit fit --config recipes/quickstart.yaml
    diffv2-lit fit --config recipes/125m-diffv2.yaml --config configs/hardware/multinode.yaml \
        --trainer.max_steps 100
    diffv2-lit fit --config recipes/quickstart.yaml --ckpt_path last        # resume
    diffv2-lit fit --config recipes/quickstart.yaml --print_config           # resolved YAML

`--config` may be repeated (later files override earlier ones), dotted flags override both, and
the resolved config is saved as config.yaml in every run's log folder.

Fault tolerance (docs/faults.md): every run gets `AtomicCheckpointIO` (crash-safe checkpoint files)
and `PreemptionCheckpoint` (SIGTERM / SIGUSR1 -> checkpoint at the next step, clean exit) unless the
config brings its own; `--global_batch_size` derives the gradient accumulation; configuration
mistakes end with one line naming the key (exit code 2), runtime faults (corrupt data or
checkpoint, a checkpoint of another model, out of memory) with a message saying what to do (exit
code 1). DIFFV2_LIT_DEBUG=1 shows the full traceback instead.

Checkpoints (`--ckpt_path`, `--model.init_from`, Lightning's own restore inside fit/validate) are read
as data only (safe_load.py): one that needs more is refused (exit code 1) unless
DIFFV2_LIT_TRUST_CHECKPOINTS=1; `--weights_only false` is refused in its favour.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import signal
import sys
import warnings
from typing import Literal

import lightning as L
import torch
import yaml
from lightning.fabric.plugins import CheckpointIO
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from diffv2_lit.checkpoint import compat, resume
from diffv2_lit.cli import usage
from diffv2_lit.cli.errors import fail
from diffv2_lit.checkpoint import CheckpointError, CheckpointPathError
from diffv2_lit.errors import EXIT_FAULT, EXIT_USAGE, DiffV2Error
from diffv2_lit.model.config import ConfigError
from diffv2_lit.checkpoint.atomic_io import AtomicCheckpointIO
from diffv2_lit.checkpoint.layout import checkpoint_problem, unreadable_message
from diffv2_lit.model import resolve_model_config
from diffv2_lit.training.handshake import check_data_fits_model
from diffv2_lit.training.module import DecoderLM
from diffv2_lit.callbacks.cleanup import RemoveEmptyRunFolder
from diffv2_lit.callbacks.resume import ConsistentResume
from diffv2_lit.callbacks.preemption import PreemptionCheckpoint
from diffv2_lit.callbacks.progress import StepProgressBar
from diffv2_lit.checkpoint.safe_load import TRUST_ENV, guard_restore

# TensorBoard by default; each run gets its own runs/<name>/version_<n> folder, and checkpoints go
# to its checkpoints/ subfolder (ModelCheckpoint's default dirpath).
TRAINER_DEFAULTS = {
    "logger": {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "diffv2-lit"},
    },
}


DEFAULT_DATA_MODULE = "diffv2_lit.data.datamodule.TokenDataModule"


# The end of `fit --help`: the nested classes' options are not listed above, only their class paths.
HELP_EPILOG = ("Options of the nested classes: `--data.help TokenDataModule` (or the data module's class, e.g. "
               "SyntheticDataModule) and `--model.architecture.help Architecture` (preset and ModelConfig fields); "
               "`--trainer.callbacks.help ModelCheckpoint` for a callback. `--print_config` prints the resolved YAML "
               "(docs/training.md).")


EXIT_INTERRUPTED = 130  # 128 + SIGINT: the shell's code for a program stopped by Ctrl-C (after its checkpoint)


class _ConciseParser(LightningArgumentParser):
    """jsonargparse prints the whole usage (a hundred lines) before an error; print only the error. No
    abbreviations: argparse would silently read `--trainer.max_step` as `--trainer.max_steps`."""

    typed: list[str] = []  # the command line being parsed (build_cli), to name a key as the user wrote it

    def __init__(self, *args, **kwargs) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def dump(self, cfg, *args, **kwargs):
        """`--print_config` (the one dump of a run given it; it exits after) shows what the preset resolves to."""
        if _printing_config(_ConciseParser.typed):
            cfg = _with_resolved_architecture(cfg)
        return super().dump(cfg, *args, **kwargs)

    def error(self, message: str, ex: Exception | None = None):
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG"):
            return super().error(message, ex)
        line = usage.one_line_parser_error(message, _ConciseParser.typed, _option_strings(self))
        _exit(EXIT_USAGE, line if ".help " in line else f"{line}  (`diffv2-lit fit --help` lists the options)")


def _printing_config(args: list[str]) -> bool:
    return any(arg.split("=", 1)[0] == "--print_config" for arg in args)


def _with_resolved_architecture(cfg):
    """`model.architecture: {preset: quickstart, n_layers: null, ...}` -> the preset's n_layers, dim, ... in place of
    the nulls (a copy; the file written that way builds the same model). A spec that does not resolve stays as
    it is: the run itself then names the key."""
    key = "model.architecture"
    architecture = cfg.get(key) if hasattr(cfg, "get") else None
    if hasattr(architecture, "get") and architecture.get("init_args") is not None:
        key, architecture = f"{key}.init_args", architecture.get("init_args")  # how jsonargparse holds it to dump
    if not hasattr(architecture, "as_dict"):
        return cfg  # a plain preset name, or not a fit config
    try:
        resolved = resolve_model_config(architecture.as_dict())
    except (ConfigError, TypeError, ValueError):
        return cfg
    cfg = cfg.clone()
    for name, value in dataclasses.asdict(resolved).items():
        if cfg.get(f"{key}.{name}", "absent") is None:
            cfg[f"{key}.{name}"] = value
    return cfg


def _option_strings(parser) -> list[str]:
    """Every flag of a parser and of its subcommands' parsers (`fit`'s when the error is the main parser's).
    argparse keeps them in private attributes: if those change, the error line only loses its suggestion
    (tests/cli/test_typos.py notices)."""
    options = []
    for action in getattr(parser, "_actions", ()):
        options += action.option_strings
        if hasattr(action, "_name_parser_map"):  # the subcommands action: its choices are their parsers
            for subcommand_parser in action.choices.values():
                options += _option_strings(subcommand_parser)
    return options


class DiffV2CLI(LightningCLI):
    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("parser_class", _ConciseParser)
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        # One seed for the whole run unless the user says otherwise (reproducible by default).
        parser.set_defaults({"seed_everything": 1234})
        # Without a `data:` section, train on the built-in corpus (TokenDataModule's own defaults).
        parser.set_defaults({"data": {"class_path": DEFAULT_DATA_MODULE}})
        parser.add_argument(
            "--global_batch_size", type=int | None, default=None,
            help="Sequences per optimizer step over all devices; derives trainer.accumulate_grad_batches = "
                 "global_batch_size / (data.batch_size x devices x nodes) and refuses one that does not divide.")
        parser.add_argument(
            "--float32_matmul_precision", type=Literal["highest", "high", "medium"], default="high",
            help="torch.set_float32_matmul_precision on CUDA machines (Lightning advises it at every start): "
                 "'high' lets fp32 matmuls (the fp32 master weights' and the loss's) use TF32 tensor cores.")

    def _parse_ckpt_path(self) -> None:
        """Lightning 2.6 parses an explicit `--ckpt_path FILE`'s hyper-parameters over the config, which
        (a) fails on DecoderLM's extra hparams (`model_config`, `tokenizer`: "Parsing of ckpt_path
        hyperparameters failed!"), (b) would silently replace the user's model settings with the
        checkpoint's, and (c) torch.loads a damaged file with a pickle traceback. The config stays the
        user's; `_check_checkpoint` refuses a checkpoint that does not match it, naming the fields."""

    # ---- checks before anything heavy -------------------------------------------------------

    def before_instantiate_classes(self) -> None:
        config = self.config.get(str(self.subcommand), self.config) if self.subcommand else self.config
        if torch.cuda.is_available():  # before the Trainer exists, which otherwise prints its advice
            torch.set_float32_matmul_precision(config.get("float32_matmul_precision") or "high")
        self._model_config(config)  # a ModelConfig that cannot be built: one line naming the key, now
        if self.subcommand == "fit":
            _claim_version_folder(config.get("trainer"))

    @staticmethod
    def _model_config(config):
        spec = config.model.architecture
        spec = spec.as_dict() if hasattr(spec, "as_dict") else spec
        try:
            return resolve_model_config(spec)
        except ConfigError as err:
            raise usage.model_config_error(err) from None

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except DiffV2Error:
            raise  # its class carries its exit code (a data setting, DataSettingError: 2)
        except (ValueError, TypeError) as err:
            # Raised by an __init__ while building the configured classes: a configuration mistake.
            raise usage.UsageError(usage.one_line_parser_error(str(err))) from err
        # The data-model handshake DecoderLM.configure_model runs too, here before any run folder exists.
        check_data_fits_model(self.model.model_config, self.datamodule)

    def instantiate_trainer(self, **kwargs):
        trainer_config = self._get(self.config_init, "trainer", default={})
        if self.subcommand == "validate":
            self.save_config_callback = None  # validate starts no run folder (before_validate), so no config.yaml
        kwargs.setdefault("plugins", _with_atomic_io(trainer_config.get("plugins"), trainer_config.get("strategy")))
        callbacks = _as_list(trainer_config.get("callbacks"))
        added = [] if any(isinstance(c, PreemptionCheckpoint) for c in callbacks) else [PreemptionCheckpoint()]
        added += [RemoveEmptyRunFolder(), ConsistentResume()]
        if trainer_config.get("enable_progress_bar", True) is not False and \
                not any(isinstance(c, ProgressBar) for c in callbacks):
            added.append(StepProgressBar())  # step / max_steps, loss, tokens/s, ETA (callbacks/progress.py)
        if added:
            kwargs.setdefault("callbacks", callbacks + added)
        trainer = super().instantiate_trainer(**kwargs)
        _check_parallel_sizes(self._get(self.config, "trainer", default={}), trainer.world_size)
        guard_restore(trainer.strategy)  # Lightning's restore inside fit/validate reads data only
        self._apply_global_batch(trainer)
        return trainer

    def _apply_global_batch(self, trainer: L.Trainer) -> None:
        global_batch = self._get(self.config_init, "global_batch_size", default=None)
        if global_batch is None:
            return
        micro = getattr(self.datamodule, "batch_size", None)
        trainer.accumulate_grad_batches = usage.accumulation_for(
            global_batch, micro, trainer.world_size, trainer.accumulate_grad_batches)
        _print_rank_zero(f"global batch {global_batch} = {micro} per device x {trainer.world_size} device(s) x "
                         f"{trainer.accumulate_grad_batches} accumulation step(s)")

    # ---- resume -------------------------------------------------------------------------------

    def before_fit(self) -> None:
        self._refuse_unrestricted_loading("fit")
        self._resolve_last("fit")
        self._check_checkpoint("fit")  # a finished run stops here, before any line says it resumes
        self._say_which_checkpoint("fit", "resuming from")
        _report_outputs(self.trainer, at_start=True)  # where to look while it runs, not only at the end

    def before_validate(self) -> None:
        self._refuse_unrestricted_loading("validate")
        self._resolve_last("validate")
        self._check_checkpoint("validate")
        self._say_which_checkpoint("validate", "validating")
        # A validation is not a run: in a new version_<n> its loss would sit at step 0 beside the training curves
        # (`compare`, TensorBoard) and the folder would hold no checkpoint. Lightning prints its numbers.
        self.trainer.loggers = []

    def _say_which_checkpoint(self, subcommand: str, verb: str) -> None:
        path = self.config_init[subcommand].get("ckpt_path")
        if not path or path in ("last", "best", "hpc", "registry") or not os.path.exists(path):
            return
        _print_rank_zero(f"{verb} {path} (step {resume.read_recorded(path).step})")

    def _refuse_unrestricted_loading(self, subcommand: str) -> None:
        """Lightning's `--weights_only false` would unpickle anything: the one opt-in is the environment
        variable, which still tries the restricted load first and names what it trusted."""
        if self.config_init[subcommand].get("weights_only") is False:
            raise usage.UsageError(
                f"--weights_only false: diffv2-lit loads checkpoints as data only (docs/faults.md). To load one "
                f"that needs more and whose source you trust, set {TRUST_ENV}=1 instead.")

    def _resolve_last(self, subcommand: str) -> None:
        """`--ckpt_path last` across runs: every run logs into a new version folder, and Lightning would look for
        `last.ckpt` only in the new (empty) one. checkpoint/resume.py chooses, by recorded step and settings."""
        if self.config_init[subcommand].get("ckpt_path") != "last":
            return
        where = _checkpoint_folders(self.trainer)
        # fit continues a run (its optimizer and data must be this run's); validate evaluates any of this model.
        run = subcommand == "fit"
        choice = resume.choose_last(resume.candidates(_checkpoint_globs(self.trainer)), self.model.model_config,
                                    dict(self.model.hparams) if run else {},
                                    dict(getattr(self.datamodule, "hparams", {}) or {}) if run else {})
        for path, problem in choice.incomplete:
            rank_zero_warn(f"--ckpt_path last: skipping {path}: {problem}")
        if choice.path:
            self.config_init[subcommand]["ckpt_path"] = choice.path  # named by _say_which_checkpoint
            return
        if choice.other_runs:
            raise usage.UsageError(resume.other_run_message(choice, where))
        if choice.incomplete and not choice.other_variants:
            raise CheckpointError(
                f"--ckpt_path last: every checkpoint under {where} is incomplete ({len(choice.incomplete)}, e.g. "
                f"{choice.incomplete[0][0]}: {choice.incomplete[0][1]}), so there is nothing to resume; move them away "
                "to start from step 0, or pass --ckpt_path to a complete checkpoint of another run.")
        # Nothing of this model to resume: say so plainly (instead of Lightning's "no last checkpoint
        # available" warning) and start from step 0; a job that always passes `last` starts the same way.
        self.config_init[subcommand]["ckpt_path"] = None
        message = f"--ckpt_path last: no checkpoint of this model under {where}"
        if choice.other_variants:
            path, problem = choice.other_variants[0]
            message += (f"; {len(choice.other_variants)} checkpoint(s) there belong to another model (e.g. {path}: "
                        f"{problem}). To resume one of those, use the recipe it was trained with")
        _print_rank_zero(message + ("; starting from step 0." if subcommand == "fit" else "."))

    def _check_checkpoint(self, subcommand: str) -> None:
        """A given checkpoint must be complete and of this model: say so now, before the model is built, not
        as a load traceback. (Lightning's restore checks again, through AtomicCheckpointIO and
        DecoderLM.on_load_checkpoint, for runs that start from Python.)"""
        path = self.config_init[subcommand].get("ckpt_path")
        if not path or path in ("last", "best", "hpc", "registry"):
            return
        if not os.path.exists(path) and not os.path.islink(path):  # a mistake in the command, not a damaged file
            raise CheckpointPathError(unreadable_message(path, "it does not exist"))
        compat.check_resumable(path, self.model.model_config)
        if subcommand == "fit":
            self._check_steps_left(path)

    def _check_steps_left(self, path: str) -> None:
        """Lightning would end a resume at or past max_steps at once, saying nothing."""
        max_steps, step = self.trainer.max_steps, resume.read_recorded(path).step
        if max_steps is None or max_steps < 0 or step < max_steps:
            return
        if step == max_steps:
            _print_rank_zero(f"{path} is at step {step} = trainer.max_steps: the run is finished; raise "
                             "--trainer.max_steps to train it further.")
            sys.exit(0)
        raise usage.UsageError(f"trainer.max_steps={max_steps} is below the step of {path} ({step}): nothing would be "
                               f"trained; raise --trainer.max_steps above {step} to continue it.")


class _ParseOnlyCLI(DiffV2CLI):
    """Parses and validates a config (types, class paths, values) without building anything:
    lets tests and `--print_config`-style checks read GPU recipes on a CPU machine."""

    def before_instantiate_classes(self) -> None:
        pass  # the cross-key checks belong to real runs; fragments alone may be incomplete

    def instantiate_classes(self) -> None:
        pass


def build_cli(argv: list[str] | None, run: bool = True, cli_class: type[LightningCLI] = DiffV2CLI) -> LightningCLI:
    _ConciseParser.typed = list(sys.argv[1:] if argv is None else argv)
    return cli_class(
        DecoderLM,
        L.LightningDataModule,
        subclass_mode_data=True,
        # The optimizer needs the (possibly FSDP-sharded) parameters: DecoderLM builds it itself.
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        parser_kwargs={subcommand: {"epilog": HELP_EPILOG} for subcommand in ("fit", "validate")},
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
    if not os.environ.get("DIFFV2_LIT_DEBUG"):
        _quiet_known_noise()
    args = sys.argv[1:] if argv is None else list(argv)
    try:
        if os.environ.get("DIFFV2_LIT_DEBUG"):
            return _run(argv)
        return _checked_run(args, argv)
    except BaseException:  # a mistake, a fault, a refused or finished resume (SystemExit)
        _release_unused_folder()
        raise
    finally:
        _claimed.clear()


def _checked_run(args: list[str], argv: list[str] | None) -> LightningCLI:
    try:
        _check_yaml_files(args)
        return _run(argv)
    except DiffV2Error as err:
        _exit(err.exit_code, str(err))
    except Exception as err:
        if usage.is_out_of_memory(err):
            _exit(EXIT_FAULT, usage.OOM_ADVICE.format(error=_first_line(err)))
        raise


def _run(argv: list[str] | None) -> LightningCLI:
    # LightningCLI warns when given args that also sit in sys.argv (the console-script case).
    cli = build_cli(None if argv is None or list(argv) == sys.argv[1:] else argv)
    if cli.subcommand == "fit":
        _report_outputs(cli.trainer)  # validate wrote no folder: Lightning's table of its numbers is the report
    if any(isinstance(c, PreemptionCheckpoint) and c.saved_path and c.received == signal.SIGINT
           for c in cli.trainer.callbacks):
        sys.exit(EXIT_INTERRUPTED)  # saved and stopped by Ctrl-C: not a finished run, whatever Lightning says
    return cli


# Messages every run would print that say nothing about this run (DIFFV2_LIT_DEBUG=1 shows them):
NOISY_WARNINGS = (
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",        # Lightning's own use of a torch API
    r"Your `IterableDataset` has `__len__` defined",             # our streaming loaders are sized on purpose
    r"The dirpath has changed from",                              # a resume logs into a new version folder
)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()  # an advert Lightning logs at every start


def _quiet_known_noise() -> None:
    for pattern in NOISY_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    # One line per warning: the source line Python prints under it is the warn() call, not the cause.
    warnings.formatwarning = lambda message, category, *_, **__: f"{category.__name__}: {message}\n"
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_DropAdverts())


# The run folder this process claimed (rank 0 of a fit), removed at exit if the run left nothing in it.
_claimed: list[tuple[str, str | None]] = []  # (version folder, outermost folder made for it)
VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")


def _claim_version_folder(trainer_config) -> None:
    """Two fits started together into one folder both took `version_0` (the logger picks the next free
    number when it first writes, seconds later): their logs merged and one config.yaml overwrote the other.
    Rank 0 makes the folder now (`mkdir` either creates it or fails: one winner per number) and tells the
    logger its number; the other ranks of the run never write logs."""
    logger = trainer_config.get("logger") if trainer_config is not None else None
    init_args = logger.get("init_args") if hasattr(logger, "get") else None
    if init_args is None or not str(logger.get("class_path", "")).endswith(VERSIONED_LOGGERS) or \
            init_args.get("version") is not None or rank_zero_only.rank != 0:
        return
    parent = os.path.join(str(init_args.get("save_dir") or "."), str(init_args.get("name") or ""))
    created = os.path.abspath(parent)  # the outermost folder this makes, removed too if the run leaves nothing
    while not os.path.exists(os.path.dirname(created)):
        created = os.path.dirname(created)
    created = created if not os.path.exists(created) else None
    os.makedirs(parent, exist_ok=True)
    taken = [int(n[len("version_"):]) for n in os.listdir(parent) if n.startswith("version_") and n[8:].isdigit()]
    version = max(taken, default=-1) + 1
    while True:
        try:
            os.mkdir(os.path.join(parent, f"version_{version}"))
            break
        except FileExistsError:
            version += 1
    init_args["version"] = version
    _claimed.append((os.path.join(parent, f"version_{version}"), created))


def _release_unused_folder() -> None:
    """The claimed folder of a run that stopped before logging or saving anything (a refused resume, a
    configuration mistake found late): no empty `version_<n>` is left behind."""
    from pathlib import Path

    from diffv2_lit.callbacks.cleanup import holds_nothing

    while _claimed:
        folder, created = _claimed.pop()
        if not os.path.isdir(folder) or not holds_nothing(Path(folder)):
            continue
        shutil.rmtree(folder, ignore_errors=True)
        parent = os.path.abspath(os.path.dirname(folder))
        while created and parent.startswith(created) and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
            parent = os.path.dirname(parent)


def _check_yaml_files(args: list[str]) -> None:
    """A malformed --config file: name the file and the line (jsonargparse says `<unicode string>`)."""
    for i, arg in enumerate(args):
        path = args[i + 1] if arg in ("--config", "-c") and i + 1 < len(args) else (
            arg.split("=", 1)[1] if arg.startswith("--config=") else None)
        if not path or not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                yaml.load(f, Loader=_UniqueKeyLoader)
        except _DuplicateKey as err:
            raise usage.UsageError(f"{path}: key {err.key!r} appears twice in one mapping (lines {err.first} and "
                                   f"{err.second}); YAML would silently keep only the second: merge them into one") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(err, "problem", None) or str(err)
            raise usage.UsageError(f"malformed YAML in {path}{where}: {problem}") from None


class _DuplicateKey(Exception):
    def __init__(self, key, first: int, second: int) -> None:
        self.key, self.first, self.second = key, first, second


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key repeated in one mapping (a second `model:` block dropped the first)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if key == "<<" or not isinstance(key, (str, int, float, bool, type(None))):
                continue  # a merge key, or a key YAML itself cannot make a dict of
            if key in seen:
                raise _DuplicateKey(key, seen[key], line)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _exit(code: int, message: str) -> None:
    prog = "diffv2-lit " + (sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] in ("fit", "validate") else "fit")
    sys.exit(fail(prog, message, code))


def _check_parallel_sizes(trainer_config, world_size: int) -> None:
    """ModelParallelStrategy's sizes must multiply to the world size; Lightning finds out only once every rank
    has started, and each rank then raises a traceback. One line, before any process starts."""
    strategy = trainer_config.get("strategy") if trainer_config else None
    if not hasattr(strategy, "get") or not str(strategy.get("class_path", "")).endswith("ModelParallelStrategy"):
        return
    args = strategy.get("init_args") or {}
    data, tensor = args.get("data_parallel_size", "auto"), args.get("tensor_parallel_size", "auto")
    if isinstance(data, int) and isinstance(tensor, int) and data * tensor != world_size:
        raise usage.UsageError(
            f"trainer.strategy.init_args: data_parallel_size={data} x tensor_parallel_size={tensor} must equal the "
            f"world size {world_size} (trainer.devices x trainer.num_nodes); for FSDP2 over every GPU set "
            f"--trainer.strategy.init_args.data_parallel_size {world_size // max(tensor, 1) or world_size}.")


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def _with_atomic_io(plugins, strategy) -> list:
    """The configured plugins plus AtomicCheckpointIO, unless a CheckpointIO is already chosen."""
    plugins = _as_list(plugins)
    if any(isinstance(p, CheckpointIO) for p in plugins) or getattr(strategy, "_checkpoint_io", None) is not None:
        return plugins
    return plugins + [AtomicCheckpointIO()]


def _checkpoint_globs(trainer: L.Trainer) -> list[str]:
    folders = [callback.dirpath for callback in trainer.checkpoint_callbacks if getattr(callback, "dirpath", None)]
    logger = trainer.logger
    if logger is not None and logger.save_dir is not None:
        folders.append(os.path.join(logger.save_dir, str(logger.name), "*", "checkpoints"))
    return folders


def _checkpoint_folders(trainer: L.Trainer) -> str:
    return " or ".join(_checkpoint_globs(trainer)) or "the checkpoint folder"


@rank_zero_only
def _print_rank_zero(message: str) -> None:
    print(message)


@rank_zero_only
def _report_outputs(trainer: L.Trainer, at_start: bool = False) -> None:
    """Say where the TensorBoard logs, the resolved config and the checkpoints go (at the start) or went."""
    lines = []
    log_dir = _log_dir(trainer)
    if log_dir:
        lines.append(f"logs and resolved config: {log_dir}  (tensorboard --logdir {log_dir})")
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None) or (os.path.join(log_dir, "checkpoints") if callback and log_dir
                                                     else None)
    if dirpath and (at_start or os.path.isdir(dirpath)):  # at the end, only a folder that was written
        last = getattr(callback, "last_model_path", "")
        lines.append(f"checkpoints: {dirpath}" + (f"  (last: {last})" if last and not at_start else ""))
    for line in lines:
        print(line)


def _log_dir(trainer: L.Trainer) -> str | None:
    """`trainer.log_dir` without its broadcast: called on rank zero only, after the other ranks have
    left, a collective there fails ("Connection closed by peer") and the multi-process run exits 1."""
    logger = trainer.logger
    if logger is None:
        return None
    return getattr(logger, "log_dir", None) or logger.save_dir
