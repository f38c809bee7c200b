"""Which checkpoint `--ckpt_path last` resumes: decided from what the checkpoints record, never from file times.

Every run logs into a new version folder, so `last` looks at every version of the run's logger folder
(and a ModelCheckpoint's fixed dirpath). Of the complete checkpoints found there it resumes the one at
the highest optimizer step among those of *this run*: same model, same optimizer and schedule, same data
(`RUN_FIELDS`). The others are sorted out, so that the caller can say why nothing was resumed:

- another attention variant (the twins of one recipe log into one folder): set aside, start from step 0;
- this variant with another shape, optimizer or data (a sweep in one folder, an edited recipe): refused,
  naming the settings that differ, since continuing it would silently train something else;
- incomplete ones (a save killed half-way) are skipped; when every checkpoint is, the run is refused
  rather than started from 0 over checkpoints the user may want.

The decision is a pure function of the files, so every rank (every node) reaches the same one before a
process group exists; `callbacks.resume.ConsistentResume` checks that they did.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path

from diffv2_lit.checkpoint.compat import RESUME_FIELDS
from diffv2_lit.checkpoint.layout import LIGHTNING_META, checkpoint_problem, read_complete_marker
from diffv2_lit.checkpoint.safe_load import load_complete

# The settings that make two checkpoints of one model shape parts of different runs. Batch size, device
# count, workers and max_steps are left out: a resume may change them and continue exactly.
OPTIMIZER_FIELDS = ("optimizer", "lr", "betas", "eps", "weight_decay", "schedule", "warmup_steps", "min_lr_ratio",
                    "decay_fraction")
DATA_FIELDS = ("data_dir", "mix", "seq_len", "seed", "shuffle", "pack", "tokenizer")


@dataclass
class Recorded:
    """What a complete checkpoint records about its run (read without loading a tensor)."""

    path: str
    step: int
    model: dict      # DecoderLM's hyper-parameters
    data: dict       # the data module's hyper-parameters ({} when it saves none)


@dataclass
class LastChoice:
    path: str | None = None
    step: int = 0
    incomplete: list[tuple[str, str]] = field(default_factory=list)       # (path, problem)
    other_variants: list[tuple[str, str]] = field(default_factory=list)   # (path, what differs)
    other_runs: list[tuple[Recorded, list[str]]] = field(default_factory=list)  # newest first


def read_recorded(path: str) -> Recorded:
    """The step and settings a complete checkpoint records: a sharded folder's complete.json and meta.pt, or a
    file's pickled part (memory-mapped: its tensors are not read)."""
    folder = Path(path)
    if folder.is_dir():
        checkpoint = load_complete(folder, folder / LIGHTNING_META)
        step = read_complete_marker(folder)["global_step"]
    else:
        checkpoint = load_complete(folder, mmap=True)
        step = checkpoint.get("global_step", 0)
    return Recorded(path, int(step), checkpoint.get("hyper_parameters") or {},
                    checkpoint.get("datamodule_hyper_parameters") or {})


def differences(recorded: Recorded, model_config, model_hparams: dict, data_hparams: dict) -> list[str]:
    """The settings of this run that differ from the checkpoint's, as `key: checkpoint X, this run Y`."""
    saved_config = recorded.model.get("model_config") or {}
    found = []
    for name in RESUME_FIELDS:  # shapes and what changes the computation
        if name in saved_config and saved_config[name] != getattr(model_config, name):
            found.append(f"model.architecture.{name}: checkpoint {saved_config[name]!r}, this run "
                         f"{getattr(model_config, name)!r}")
    for prefix, saved, current, names in (("model", recorded.model, model_hparams, OPTIMIZER_FIELDS),
                                          ("data", recorded.data, data_hparams, DATA_FIELDS)):
        for name in names:
            if name in saved and name in current and _plain(saved[name]) != _plain(current[name]):
                found.append(f"{prefix}.{name}: checkpoint {_plain(saved[name])!r}, this run {_plain(current[name])!r}")
    return found


def _plain(value):
    """Lists and tuples alike (YAML gives lists, a checkpoint may hold tuples)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def candidates(folders: list[str]) -> list[str]:
    """Every `*.ckpt` (file or sharded folder) in the given folders (glob patterns allowed)."""
    return sorted({p for folder in folders for p in glob.glob(os.path.join(folder, "*.ckpt"))})


def choose_last(paths: list[str], model_config, model_hparams: dict, data_hparams: dict) -> LastChoice:
    choice, matching = LastChoice(), []
    recorded = []
    for path in paths:
        problem = checkpoint_problem(path)
        if problem:
            choice.incomplete.append((path, problem))
            continue
        try:
            recorded.append(read_recorded(path))
        except Exception as err:  # damaged although it looks complete: skip it like an incomplete one
            choice.incomplete.append((path, str(err).splitlines()[0] if str(err) else type(err).__name__))
    # Highest step first; at one step prefer `last*` (the same state as step=N.ckpt), then the newer write.
    recorded.sort(key=lambda r: (r.step, Path(r.path).name.startswith("last"), os.path.getmtime(r.path)), reverse=True)
    for entry in recorded:
        saved_attention = (entry.model.get("model_config") or {}).get("attention")
        if saved_attention is not None and saved_attention != model_config.attention:
            choice.other_variants.append((entry.path, f"attention {saved_attention!r}, this run "
                                                      f"{model_config.attention!r}"))
            continue
        differing = differences(entry, model_config, model_hparams, data_hparams)
        (choice.other_runs.append((entry, differing)) if differing else matching.append(entry))
    if matching:
        choice.path, choice.step = matching[0].path, matching[0].step
    return choice


def other_run_message(choice: LastChoice, where: str) -> str:
    """Why `last` refuses to continue the newest checkpoint of this variant, and the ways on."""
    entry, differing = choice.other_runs[0]
    message = (f"--ckpt_path last: the newest checkpoint of this model under {where}, {entry.path} (step {entry.step}), "
               f"was trained with other settings ({'; '.join(differing)}). Resume it with its own settings")
    if all(d.startswith("model.") and not d.startswith("model.architecture.") for d in differing):
        message += f", pass --ckpt_path {entry.path} to continue it with this run's settings,"
    return message + " or give this run a folder of its own (--trainer.logger.init_args.name NAME)."


def latest_complete(folder) -> Recorded | None:
    """The complete checkpoint at the highest step in `folder` (any run), None when there is none."""
    found = []
    for path in candidates([str(folder)]):
        if checkpoint_problem(path) is None:
            try:
                found.append(read_recorded(path))
            except Exception:
                continue
    return max(found, key=lambda r: (r.step, Path(r.path).name.startswith("last")), default=None)
