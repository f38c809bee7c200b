"""Overlay several TensorBoard runs in a Markdown page with PNG charts (`diffv2-lit compare`, cli/compare.py).

    diffv2-lit compare runs/quickstart --output report/

Each argument is a run folder or a folder holding runs: every folder below it that holds a TensorBoard
event file is one run. `version_N` folders with nothing logged (left by runs that failed early) are
skipped with a warning.

Labels: the logger name (the folder above `version_N`), plus the attention variant when the name does
not say it, plus each setting in which the run differs from the runs sharing its logger name (recipe
twins share one: runs/quickstart holds quickstart-diffv2 and quickstart-baseline). The variant and the
settings are read from the config.yaml that `diffv2-lit fit` writes into each run folder (LightningCLI's
resolved config: model.architecture.attention, the rest of model and data, and trainer max_steps, precision,
accumulate_grad_batches, gradient_clip_val); a run folder without one falls back to the model_config in
its hparams.yaml, then to the name alone.

Groups: runs that differ only in their seed (seed_everything or data.seed in config.yaml, or a trailing
`seedN` in the logger name) are one group: charts draw the group mean with its min-max band, the table
gives mean ± std. Runs with the same settings and the same seed_everything are one run logged in pieces
(a resumed or restarted run): their curves are joined in version order; where pieces overlap, the one
that reaches further wins.

Spikes are marked at the step and the value GradientSpikeDetector's spikes.jsonl records for each run, in the
colour of the run's line (the logged gradient norm holds every log_every_n_steps-th step only).

The table summarises each column over a stated window, not by its last logged value: tokens/s and MFU are the
median over the last 10% of each run's steps (at least its last 5 values), the validation loss the final one;
the page states each column's window under the table.

Charts plot against tokens seen (perf/tokens_seen) when it was logged, else optimizer steps. A group's
mean stops where its shortest seed stops; the page says so under the chart. Event files are read with
tensorboard's own EventAccumulator.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from diffv2_lit.errors import EXIT_USAGE, DiffV2Error

@dataclass(frozen=True)
class Chart:
    tags: tuple[str, ...]  # the tags it may draw, first match wins, so the report tolerates older runs
    y_label: str  # what is plotted, with its unit (short: it must fit beside the axis)
    about: str = ""  # a line under the chart in the report, where the label cannot say it all
    log_y: bool = False
    spike_kinds: tuple[str, ...] = ()  # the spikes marked on it, each at its own value (see read_spikes)


LOSS = "cross-entropy (nats/token)"
PROBE = "DiffMonitor's numbers, on its fixed probe batch (docs/monitoring.md, \"DiffMonitor\"): "
CHARTS: dict[str, Chart] = {
    "train loss": Chart(("train/loss",), LOSS, "Loss spikes (`watch_loss: true`) are marked where they happened.",
                        spike_kinds=("loss", "non_finite_loss")),
    "validation loss": Chart(("val/loss",), LOSS),
    # A spike is many times the level: on a linear axis it flattens the rest of the curve into the floor.
    "gradient norm (before clipping)": Chart(
        ("train/grad_norm",), "global L2 norm (log scale)",
        "The line is the norm logged every `log_every_n_steps`; the crosses are the spikes GradientSpikeDetector "
        "flagged, at their own step and value (spikes.jsonl).",
        log_y=True, spike_kinds=("grad_norm", "non_finite_grad_norm", "event")),
    "learning rate": Chart(("lr", "train/lr", "lr-AdamW"), "learning rate"),
    "sigmoid(lambda) mean (DIFF)": Chart(("diff/lambda_mean",), "sigmoid(λ) (V1: λ)",
                                         PROBE + "mean over probe tokens, heads and layers."),
    "context RMS, mean": Chart(("diff/context_rms_mean",), "head-output RMS",
                               PROBE + "RMS over the head dimension of each head's output, mean over layers."),
    "context RMS, 5th percentile": Chart(("diff/context_rms_p05",), "head-output RMS, 5th pct.",
                                         PROBE + "5th percentile over (token, head), mean over layers."),
    "attention sink mass": Chart(("diff/sink_mass",), "attention on the first key",
                                 PROBE + "DIFF: of the effective map a1 − sigmoid(λ)·a2, which can go below 0; "
                                         "mean over layers."),
    "max |hidden state|": Chart(("diff/max_hidden_peak", "diff/max_hidden"), "max |hidden state|",
                                PROBE + "the largest layer's."),
    "max attention logit": Chart(("diff/max_logit_peak", "diff/max_logit"), "max q·k/√d",
                                 PROBE + "the largest layer's."),
    "tokens/s": Chart(("perf/tokens_per_sec",), "tokens/s (all devices)",
                      "Logged by ThroughputMFU over each window of `log_every_n_steps` steps, validation excluded."),
}
X_LABELS = {"tokens": "tokens seen", "step": "optimizer step"}
TOKENS_TAG = "perf/tokens_seen"
SEED_SUFFIX = re.compile(r"[-_.]?seed[-_]?\d+$")
VERSION_DIR = re.compile(r"version_(\d+)")
NOT_TRAINING_TAGS = {"hp_metric"}  # what the logger writes before the first step
MARKER_BELOW = 30  # series with fewer points get markers: a line through one point draws nothing

# The settings a run is labelled by (config.yaml keys, flattened with dots): everything under model and
# data but what does not change the experiment, and these trainer keys.
TRAINER_SETTINGS = ("trainer.max_steps", "trainer.precision", "trainer.accumulate_grad_batches",
                    "trainer.gradient_clip_val", "global_batch_size")
SEED_SETTINGS = ("data.init_args.seed", "data.seed")
IGNORED_SETTINGS = SEED_SETTINGS + ("data.init_args.num_workers", "data.init_args.cache_dir",
                                    "data.init_args.storage_options", "data.num_workers", "data.cache_dir",
                                    "data.storage_options", "model.architecture.attention")
ATTENTION_SETTING = "model.architecture.attention"


@dataclass(frozen=True)
class Spike:
    """One spike GradientSpikeDetector recorded: its optimizer step, its kind (spikes.jsonl's `kind`: grad_norm,
    loss, non_finite_grad_norm, non_finite_loss; `event` when only the spike/event scalar is there) and the
    value that spiked (inf / nan for non-finite ones, None when nothing recorded it)."""
    step: int
    kind: str
    value: float | None


@dataclass
class Run:
    label: str
    path: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    group: str = ""
    name: str = ""  # the logger name
    settings: dict | None = None  # flattened config.yaml, None without one
    seed: int | None = None  # seed_everything from config.yaml
    pieces: list[Path] = field(default_factory=list)  # the folders of a run logged in several pieces
    spikes: list[Spike] = field(default_factory=list)  # what GradientSpikeDetector recorded, in step order

    def __post_init__(self) -> None:
        self.group = self.group or SEED_SUFFIX.sub("", self.label) or self.label
        self.name = self.name or self.label
        self.pieces = self.pieces or [self.path]

    def series(self, candidates: tuple[str, ...]) -> list[tuple[int, float]]:
        return next((self.scalars[tag] for tag in candidates if tag in self.scalars), [])

    def last(self, candidates: tuple[str, ...]) -> float | None:
        values = self.series(candidates)
        return values[-1][1] if values else None

    @property
    def has_data(self) -> bool:
        return any(values for tag, values in self.scalars.items() if tag not in NOT_TRAINING_TAGS)


class CompareError(DiffV2Error, ValueError):
    """Run folders that cannot be compared (missing, nothing logged); the message names them."""

    exit_code = EXIT_USAGE


def warn(message: str) -> None:
    print(f"diffv2-lit compare: warning: {message}", file=sys.stderr)


# ---- finding and reading runs ---------------------------------------------------------------


def find_run_dirs(roots: list[Path]) -> list[Path]:
    """Folders holding event files, and `version_N` folders without any (reported by load_runs)."""
    dirs: set[Path] = set()
    for root in roots:
        if not root.exists():
            raise CompareError(f"{root} does not exist; pass folders written by `diffv2-lit fit` (e.g. runs/NAME).")
        found = {p.parent for p in root.rglob("events.out.tfevents.*")}
        found |= {p for p in [root, *root.rglob("version_*")] if p.is_dir() and VERSION_DIR.fullmatch(p.name)}
        if not found:
            raise CompareError(
                f"{root} holds no TensorBoard event file (events.out.tfevents.*); point compare at the logger's "
                "save_dir or run folder of a `diffv2-lit fit` run."
            )
        dirs |= found
    return sorted(dirs, key=_version_order)


def _version_order(path: Path) -> tuple:
    match = VERSION_DIR.fullmatch(path.name)
    return (str(path.parent), int(match.group(1)), "") if match else (str(path.parent), -1, path.name)


def load_runs(run_dirs: list[Path]) -> list[Run]:
    """Every readable run with something logged; one warning line for each folder left out."""
    runs = []
    for run_dir in run_dirs:
        if not any(run_dir.glob("events.out.tfevents.*")):
            warn(f"skipping {run_dir}: no event file (a run that failed before it logged anything).")
            continue
        try:
            run = load_run(run_dir)
        except Exception as error:  # noqa: BLE001 - a damaged folder must not cost the other runs' report
            warn(f"skipping {run_dir}: cannot read it ({type(error).__name__}: {error}).")
            continue
        if not run.has_data:
            warn(f"skipping {run_dir}: nothing logged (a run that stopped before its first logged step).")
            continue
        runs.append(run)
    return runs


def load_run(run_dir: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    name = run_dir.parent.name if VERSION_DIR.fullmatch(run_dir.name) else run_dir.name
    config = _read_yaml(run_dir / "config.yaml")
    settings = run_settings(config) if config else None
    attention = settings.get(ATTENTION_SETTING) if settings else _hparams_attention(run_dir / "hparams.yaml")
    seed = config.get("seed_everything") if config else None
    if isinstance(seed, bool) or not isinstance(seed, int):
        seed = None  # seed_everything: false, or not recorded: the run's seed is unknown
    return Run(label=_with_variant(name, attention), path=run_dir, scalars=scalars, name=name, settings=settings,
               group=_with_variant(SEED_SUFFIX.sub("", name) or name, attention), seed=seed,
               spikes=read_spikes(run_dir, scalars))


def read_spikes(run_dir: Path, scalars: dict[str, list[tuple[int, float]]]) -> list[Spike]:
    """The spikes of one run folder, each with the value that spiked.

    spikes.jsonl (GradientSpikeDetector writes it into the version folder, its default log_dir) holds every
    spike's step, kind and value. The training scalars cannot stand in for it: they are logged every
    `log_every_n_steps`, so a spike between two logged steps is not in `train/grad_norm` at all. Without the
    file, the `spike/event` scalar (logged at the spike's own step) gives the steps, and the gradient norm
    logged at that step, if it was, the value."""
    path = run_dir / "spikes.jsonl"
    if not path.is_file():
        norms = dict(scalars.get("train/grad_norm", []))
        return [Spike(step, "event", norms.get(step)) for step, _ in scalars.get("spike/event", [])]
    spikes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            spikes.append(Spike(int(record["step"]), str(record["kind"]), float(record["value"])))  # "nan" -> nan
        except (ValueError, KeyError, TypeError) as error:  # a line cut short by a crash, or another file's
            warn(f"{path}, line {number}: not a spike record ({type(error).__name__}: {error}); leaving it out.")
    return sorted(spikes, key=lambda spike: spike.step)


def _with_variant(name: str, attention: str | None) -> str:
    return f"{name}-{attention}" if attention and attention not in name else name


def _read_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    import yaml

    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        warn(f"{path} is not valid YAML ({error}); labelling the run by its folder name alone.")
        return None
    return content if isinstance(content, dict) else None


def _hparams_attention(hparams_file: Path) -> str | None:
    """hparams.yaml as TensorBoardLogger writes it: model_config is there only if the module logged it."""
    hparams = _read_yaml(hparams_file) or {}
    return (hparams.get("model_config") or {}).get("attention")


def run_settings(config: dict) -> dict:
    """The settings that define a run, flattened from LightningCLI's config.yaml (see TRAINER_SETTINGS).

    `model.architecture` is resolved to the full model config, so a preset and the same preset spelled out in
    fields compare equal, and a variant left to the preset's default is still known."""
    model = dict(config.get("model") or {})
    spec = model.pop("architecture", model.pop("model", None))  # 0.1.0's config.yaml named it `model.model`
    flat = _flatten({"model": model, "data": config.get("data") or {}})
    flat.update(_flatten({"model": {"architecture": _resolved_model(spec)}}))
    everything = _flatten(config)
    flat.update({key: everything[key] for key in TRAINER_SETTINGS if key in everything})
    return flat


def _resolved_model(spec) -> dict:
    if spec is None:
        return {}
    try:
        from diffv2_lit.model import resolve_model_config

        return dataclasses.asdict(resolve_model_config(spec))
    except Exception:  # noqa: BLE001 - a config from another version: compare what it says
        return {key: value for key, value in spec.items() if value is not None} if isinstance(spec, dict) \
            else {"preset": spec}


def _flatten(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix.rstrip("."): tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}{key}."))
    return flat


# ---- grouping -------------------------------------------------------------------------------


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    """Join the pieces of each run, label the runs by what sets them apart, group them by label."""
    runs = join_pieces(runs)
    _label_differences(runs)
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


def join_pieces(runs: list[Run]) -> list[Run]:
    """Runs with the same logger name, settings and seed_everything are one run logged in pieces
    (`--ckpt_path` resumes into a new version folder); they are joined in version order."""
    joined: dict[str, Run] = {}
    result = []
    for run in sorted(runs, key=lambda r: _version_order(r.path)):
        if run.settings is None or run.seed is None:
            result.append(run)
            continue
        key = json.dumps([run.name, run.seed, run.settings], sort_keys=True, default=str)
        if key in joined:
            _append_piece(joined[key], run)
        else:
            joined[key] = run
            result.append(run)
    return result


def _append_piece(run: Run, piece: Run) -> None:
    """Where the pieces overlap (a restart from an earlier step), the one that reaches further wins."""
    reached, (start, end) = _span(run)[1], _span(piece)
    if end >= reached:
        run.spikes = [spike for spike in run.spikes if spike.step < start] + piece.spikes
    else:
        run.spikes += [spike for spike in piece.spikes if spike.step > reached]
    for tag, later in piece.scalars.items():
        earlier = run.scalars.get(tag, [])
        if not earlier or not later:
            run.scalars[tag] = earlier or later
        elif later[-1][0] >= earlier[-1][0]:
            run.scalars[tag] = [point for point in earlier if point[0] < later[0][0]] + later
        else:
            run.scalars[tag] = earlier + [point for point in later if point[0] > earlier[-1][0]]
    run.pieces.append(piece.path)


def _span(run: Run) -> tuple[int, int]:
    """The first and last step a run logged a training value at (hp_metric sits at step 0 in every piece)."""
    steps = [step for tag, values in run.scalars.items() if tag not in NOT_TRAINING_TAGS for step, _ in values]
    return min(steps), max(steps)


def _label_differences(runs: list[Run]) -> None:
    """Add `key=value` for each setting that differs among the runs sharing a logger name (seeds aside)."""
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        if run.settings is not None:
            by_name.setdefault(SEED_SUFFIX.sub("", run.name) or run.name, []).append(run)
    for peers in by_name.values():
        keys = sorted({key for run in peers for key in run.settings} - set(IGNORED_SETTINGS))
        differing = [key for key in keys if len({_shown(run.settings.get(key)) for run in peers}) > 1]
        names = _short_names(differing)
        for run in peers:
            tags = " ".join(f"{names[key]}={_shown(run.settings.get(key))}" for key in differing)
            if tags:
                run.label, run.group = f"{run.label} {tags}", f"{run.group} {tags}"


def _short_names(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key, or the whole key (without `init_args.`) where two would clash."""
    last = [key.rsplit(".", 1)[-1] for key in keys]
    return {key: short if last.count(short) == 1 else key.replace("init_args.", "") for key, short in zip(keys, last)}


def _shown(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    return str(value)


# ---- charts ---------------------------------------------------------------------------------


@dataclass
class Series:
    """One group's line on a chart: x (tokens or steps), the mean and min/max over seeds, and where
    the mean had to stop early because a seed did."""
    x: list[float]
    mean: list[float]
    low: list[float]
    high: list[float]
    x_label: str
    steps: list[int]
    cut_note: str | None = None


def _x_axis(run: Run, steps: list[int]) -> tuple[list[float], str]:
    """Tokens seen (step x tokens per step) when the run logged them, else optimizer steps.

    Every tag is placed by its step with the same tokens per step, whichever callback logged it and at
    whichever steps (DiffMonitor's are not the training metrics' steps). `perf/tokens_seen` logged at
    step s counts s + 1 steps (it is logged after the step)."""
    seen = run.series((TOKENS_TAG,))
    if not seen:
        return [float(s) for s in steps], "step"
    last_step, tokens = seen[-1]
    tokens_per_step = tokens / (last_step + 1)
    return [s * tokens_per_step for s in steps], "tokens"


def chart_series(candidates: tuple[str, ...], groups: dict[str, list[Run]]) -> dict[str, Series]:
    """The line each group draws on the chart of `candidates` (groups that logged none of them draw none)."""
    lines = {}
    for label, runs in groups.items():
        per_run = [dict(series) for series in (run.series(candidates) for run in runs) if series]
        if not per_run:
            continue
        common = sorted(set.intersection(*(set(series) for series in per_run)))
        if not common:
            continue
        values = [[series[step] for series in per_run] for step in common]
        x, x_label = _x_axis(runs[0], common)
        line = Series(x, [statistics.fmean(v) for v in values], [min(v) for v in values],
                      [max(v) for v in values], x_label, common)
        longest = max(max(series) for series in per_run)
        if longest > common[-1]:
            line.cut_note = (f"`{label}`: the mean stops at step {common[-1]}, where its shortest seed stops "
                             f"(its longest reaches step {longest}).")
        if len(per_run) < len(runs):
            missing = len(runs) - len(per_run)
            line.cut_note = " ".join(filter(None, [line.cut_note, f"`{label}`: {missing} of {len(runs)} seeds "
                                                                  "logged nothing here."]))
        lines[label] = line
    return lines


def draw_chart(title: str, chart: Chart, lines: dict[str, Series], groups: dict[str, list[Run]]):
    """A matplotlib Figure of the lines and the chart's spikes, and its notes (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(7, 4))
    notes = []
    for label, line in lines.items():
        runs = groups[label]
        marker = {"marker": "o", "markersize": 3} if len(line.x) < MARKER_BELOW else {}
        (drawn,) = ax.plot(line.x, line.mean, label=f"{label} (n={len(runs)})", linewidth=1.2, **marker)
        if len(runs) > 1:
            ax.fill_between(line.x, line.low, line.high, color=drawn.get_color(), alpha=0.2)
        if chart.spike_kinds:
            notes += _mark_spikes(ax, label, runs, chart.spike_kinds, drawn.get_color())
    ax.set(title=title, xlabel=X_LABELS[next(iter(lines.values())).x_label], ylabel=chart.y_label)
    if chart.log_y:  # plain numbers (0.1, 1, 10) rather than powers of ten, and 2 and 5 between them
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: human(value)))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: _minor_log_tick(ax, value)))
    else:
        ax.yaxis.set_major_formatter(_tick_formatter())
    ax.xaxis.set_major_formatter(_tick_formatter())
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig, notes


def _minor_log_tick(ax, value: float) -> str:
    """Label 2 and 5 of each decade while the axis spans at most 3 decades (more would crowd it)."""
    low, high = ax.get_ylim()
    mantissa = round(value / 10 ** math.floor(math.log10(value)))
    return human(value) if mantissa in (2, 5) and math.log10(high / low) <= 3 else ""


def _tick_formatter():
    """matplotlib's plain ticks (same decimals on every tick, no offset) below 1,000; 7,500 and 300k above."""
    import matplotlib.ticker

    class Ticks(matplotlib.ticker.ScalarFormatter):
        def __call__(self, value, pos=None):
            return human(value) if abs(value) >= 1e3 else super().__call__(value, pos)

    formatter = Ticks(useOffset=False)
    formatter.set_scientific(False)
    return formatter


def plot_chart(title: str, chart: Chart, groups: dict[str, list[Run]], path: Path) -> list[str] | None:
    """Write the chart's PNG; returns its notes (where a mean stops early, spikes it could not place), or None
    if nothing was drawn."""
    lines = chart_series(chart.tags, groups)
    if not lines:
        return None
    import matplotlib.pyplot as plt

    fig, spike_notes = draw_chart(title, chart, lines, groups)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [line.cut_note for line in lines.values() if line.cut_note] + spike_notes


def _mark_spikes(ax, label: str, runs: list[Run], kinds: tuple[str, ...], colour) -> list[str]:
    """Mark each run's spikes of these kinds at the value that spiked, in the colour of the run's line: one
    legend entry per group. Non-finite ones sit on the top edge. Returns a note for spikes without a value."""
    placed, non_finite, unplaced = [], [], 0
    for run in runs:
        for spike in (spike for spike in run.spikes if spike.kind in kinds):
            x = _x_axis(run, [spike.step])[0][0]
            if spike.value is None:
                unplaced += 1
            elif math.isfinite(spike.value):
                placed.append((x, spike.value))
            else:
                non_finite.append(x)
    if placed:
        ax.scatter(*zip(*placed), marker="x", s=50, linewidths=2, color=colour, zorder=3,
                   label=f"{label}: spike{'s' if len(placed) > 1 else ''} ({len(placed)})")
    if non_finite:
        ax.scatter(non_finite, [1.0] * len(non_finite), transform=ax.get_xaxis_transform(), clip_on=False,
                   marker="^", s=50, color=colour, zorder=3, label=f"{label}: non-finite ({len(non_finite)})")
    if not unplaced:
        return []
    return [f"`{label}`: {unplaced} spike{'s' if unplaced > 1 else ''} not drawn: the run folder has no "
            "spikes.jsonl (GradientSpikeDetector's log_dir was elsewhere) and no gradient norm was logged at "
            "that step."]


# ---- table ----------------------------------------------------------------------------------

# Throughput is summarised over the end of the run, not taken from its last logged window: one window that
# held a validation, a checkpoint or a text sample (or a busy machine) reads a fraction of the typical rate.
WINDOW_FRACTION = 0.1  # the last 10% of the run's steps
WINDOW_MIN_VALUES = 5  # and at least this many logged values


def final(points: list[tuple[int, float]]) -> float:
    return points[-1][1]


def largest(points: list[tuple[int, float]]) -> float:
    return max(value for _, value in points)


def recent_median(points: list[tuple[int, float]]) -> float:
    """The median of the values logged at steps >= (1 - WINDOW_FRACTION) x the last logged step, or of the last
    WINDOW_MIN_VALUES values where that window holds fewer."""
    window = [value for step, value in points if step >= (1 - WINDOW_FRACTION) * points[-1][0]]
    if len(window) < WINDOW_MIN_VALUES:
        window = [value for _, value in points[-WINDOW_MIN_VALUES:]]
    return statistics.median(window)


def human(value: float, digits: int = 4) -> str:
    """16.6k, 1.2M from 10,000 up; 7,512 from 1,000; below, `digits` significant digits (0.3967, 2.722)."""
    rounded = float(f"{value:.3g}")
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(rounded) >= max(scale, 1e4):
            return f"{rounded / scale:.3g}{suffix}"
    if abs(value) >= 1e3 or abs(value) >= 10 ** digits:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def percent(value: float, digits: int = 3) -> str:
    """A fraction as a percentage, at most 3 significant digits (MFU 0.1234 -> 12.3%)."""
    return f"{100 * value:.{min(digits, 3)}g}%"


@dataclass(frozen=True)
class Column:
    tags: tuple[str, ...]
    summary: Callable[[list[tuple[int, float]]], float]  # one run's logged points -> its figure
    shown: Callable[[float, int], str] = human  # (value, significant digits) -> the cell's text


TABLE_COLUMNS: dict[str, Column] = {
    "final val loss": Column(("val/loss",), final),
    "spikes / 1k steps": Column(("spike/per_1k_steps",), final),  # the detector's own running figures
    "largest spike ratio": Column(("spike/max_ratio",), largest),
    "tokens/s": Column(CHARTS["tokens/s"].tags, recent_median),
    "MFU": Column(("perf/mfu",), recent_median, percent),
    "peak memory GB": Column(("perf/peak_memory_gb",), largest),  # each piece of a resumed run starts from 0
}
TABLE_NOTE = (
    "Each cell is one run's figure, or the mean ± std over a group's seeds. *final val loss*: the last validation "
    "loss logged (nats/token). *spikes / 1k steps*, *largest spike ratio* (gradient norm / its running level): "
    "over the whole run (GradientSpikeDetector's running figures). *tokens/s* (all devices), *MFU*: the median of "
    "the values logged over the last {percent:.0f}% of the run's steps (steps ≥ {fraction:g} × its last logged "
    "step; at least its last {minimum} values), so one slow logging window (a validation, a checkpoint, a text "
    "sample) does not decide the figure. *peak memory GB*: the largest logged (GPU: memory allocated by tensors; "
    "CPU: the process's peak resident set).")
MISSING_NOTE = "–: the run logged no such value."
MFU_NOTE = (
    "MFU –: no dense peak FLOP rate is known for the device. ThroughputMFU looks CUDA GPUs up in `PEAK_FLOPS_BF16` "
    "(diffv2_lit/callbacks/throughput.py); on a CPU or another device, give the peak per device in FLOP/s as "
    "`peak_flops` in the recipe's ThroughputMFU `init_args`, e.g. `{log_every_n_steps: 10, peak_flops: 1.0e12}`.")


def _summary(values: list[float | None], shown: Callable[[float, int], str]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return shown(values[0], 4)
    return f"{shown(statistics.fmean(values), 4)} ± {shown(statistics.stdev(values), 2)}"


def run_figure(run: Run, column: Column) -> float | None:
    """One run's figure for the column, from its finite logged values (None where it logged none)."""
    points = [(step, value) for step, value in run.series(column.tags) if math.isfinite(value)]
    return column.summary(points) if points else None


def summary_table(groups: dict[str, list[Run]]) -> str:
    """The Markdown table, the window of each column, and what a `–` means where one shows."""
    header = "| run | seeds | " + " | ".join(TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    missing = set()
    for label, runs in groups.items():
        cells = {name: _summary([run_figure(run, column) for run in runs], column.shown)
                 for name, column in TABLE_COLUMNS.items()}
        missing |= {name for name, cell in cells.items() if cell == "–"}
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells.values()) + " |")
    notes = [TABLE_NOTE.format(percent=100 * WINDOW_FRACTION, fraction=1 - WINDOW_FRACTION, minimum=WINDOW_MIN_VALUES)]
    notes += [MISSING_NOTE] if missing - {"MFU"} else []
    notes += [MFU_NOTE] if "MFU" in missing else []
    return "\n".join(lines + [""] + [f"{note}\n" for note in notes]).rstrip("\n")


def write_report(groups: dict[str, list[Run]], output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    lines = ["# Run comparison", "", summary_table(groups), ""]
    for title, chart in CHARTS.items():
        file_name = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") + ".png"
        notes = plot_chart(title, chart, groups, output / file_name)
        if notes is not None:
            lines += [f"## {title}", "", f"![{title}]({file_name})", ""] + ([chart.about, ""] if chart.about else [])
            lines += [f"Note: {note}" for note in notes] + ([""] if notes else [])
    lines += ["## Runs", ""] + [_run_line(run) for runs in groups.values() for run in runs]
    page = output / "report.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def _run_line(run: Run) -> str:
    folders = " + ".join(f"`{piece}`" for piece in run.pieces)
    joined = " (one run logged in pieces: same settings and seed)" if len(run.pieces) > 1 else ""
    return f"- `{run.label}`: {folders}{joined}"
