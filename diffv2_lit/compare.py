"""`diffv2-lit compare`: overlay several TensorBoard runs in a Markdown page with PNG charts.

    diffv2-lit compare runs/quickstart runs/quickstart-baseline --output report/

Each argument is a run folder or a folder holding runs; every folder below it that holds a
TensorBoard event file is one run. A run is labelled by the logger name above its `version_N`
folder, plus its attention variant (from hparams.yaml) when the name does not say it, since recipe
twins share one logger name. Runs whose labels differ only by a trailing `seedN`
are one group: charts draw the group mean with its min-max band, and the table gives mean ± std.
Event files are read with tensorboard's own EventAccumulator.
"""

from __future__ import annotations

import argparse
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

# Each chart lists the tags it may draw, first match wins, so the report tolerates older runs.
CHARTS: dict[str, tuple[str, ...]] = {
    "train loss": ("train/loss",),
    "validation loss": ("val/loss",),
    "gradient norm (before clipping)": ("train/grad_norm",),
    "learning rate": ("lr", "train/lr", "lr-AdamW"),
    "sigmoid(lambda) mean (DIFF)": ("diff/lambda_mean",),
    "context RMS, mean": ("diff/context_rms_mean",),
    "context RMS, 5th percentile": ("diff/context_rms_p05",),
    "attention sink mass": ("diff/sink_mass",),
    "max |hidden state|": ("diff/max_hidden_peak", "diff/max_hidden"),
    "max attention logit": ("diff/max_logit_peak", "diff/max_logit"),
    "tokens/s": ("perf/tokens_per_sec",),
}
TOKENS_TAG = "perf/tokens_seen"
SEED_SUFFIX = re.compile(r"[-_.]?seed[-_]?\d+$")


@dataclass
class Run:
    label: str
    path: Path
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def group(self) -> str:
        return SEED_SUFFIX.sub("", self.label) or self.label

    def series(self, candidates: tuple[str, ...]) -> list[tuple[int, float]]:
        return next((self.scalars[tag] for tag in candidates if tag in self.scalars), [])

    def last(self, candidates: tuple[str, ...]) -> float | None:
        values = self.series(candidates)
        return values[-1][1] if values else None


class CompareError(ValueError):
    pass


def find_run_dirs(roots: list[Path]) -> list[Path]:
    dirs: set[Path] = set()
    for root in roots:
        if not root.exists():
            raise CompareError(f"{root} does not exist; pass folders written by `diffv2-lit fit` (e.g. runs/NAME).")
        found = {p.parent for p in root.rglob("events.out.tfevents.*")}
        if not found:
            raise CompareError(
                f"{root} holds no TensorBoard event file (events.out.tfevents.*); point compare at the logger's "
                "save_dir or run folder of a `diffv2-lit fit` run."
            )
        dirs |= found
    return sorted(dirs)


def run_label(run_dir: Path) -> str:
    """The logger name (the folder above `version_N`), plus the attention variant from hparams.yaml
    when the name lacks it: recipe twins share one logger name and differ only in the variant."""
    name = run_dir.parent.name if re.fullmatch(r"version_\d+", run_dir.name) else run_dir.name
    attention = _attention_variant(run_dir / "hparams.yaml")
    return f"{name}-{attention}" if attention and attention not in name else name


def _attention_variant(hparams_file: Path) -> str | None:
    if not hparams_file.is_file():
        return None
    import yaml

    hparams = yaml.safe_load(hparams_file.read_text()) or {}
    return (hparams.get("model_config") or {}).get("attention")


def load_run(run_dir: Path) -> Run:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    scalars = {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}
    return Run(label=run_label(run_dir), path=run_dir, scalars=scalars)


def group_runs(runs: list[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return groups


# ---- charts ---------------------------------------------------------------------------------


def _x_axis(run: Run, steps: list[int]) -> tuple[list[float], str]:
    """Tokens seen when the run logged them (tokens per step is constant), else optimizer steps."""
    seen = [(step, tokens) for step, tokens in run.series((TOKENS_TAG,)) if step > 0]
    if not seen:
        return [float(s) for s in steps], "step"
    tokens_per_step = seen[-1][1] / seen[-1][0]
    return [s * tokens_per_step for s in steps], "tokens"


def _group_band(runs: list[Run], candidates: tuple[str, ...]):
    """Mean, min and max across seeds at the steps every seed logged."""
    per_run = [dict(run.series(candidates)) for run in runs]
    common = sorted(set.intersection(*(set(series) for series in per_run))) if per_run else []
    values = [[series[step] for series in per_run] for step in common]
    return common, [statistics.fmean(v) for v in values], [min(v) for v in values], [max(v) for v in values]


def plot_chart(title: str, candidates: tuple[str, ...], groups: dict[str, list[Run]], path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn, x_label = False, "step"
    for label, runs in groups.items():
        steps, mean, low, high = _group_band(runs, candidates)
        if not steps:
            continue
        x, x_label = _x_axis(runs[0], steps)
        ax.plot(x, mean, label=f"{label} (n={len(runs)})", linewidth=1.2)
        if len(runs) > 1:
            ax.fill_between(x, low, high, alpha=0.2)
        if "grad" in candidates[0]:
            _mark_spikes(ax, runs, x, steps)
        drawn = True
    if drawn:
        ax.set(title=title, xlabel=x_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return drawn


def _mark_spikes(ax, runs: list[Run], x: list[float], steps: list[int]) -> None:
    """Mark the steps where the spike counter went up."""
    where = dict(zip(steps, x))
    norms = dict(runs[0].series(("train/grad_norm",)))
    counts = runs[0].series(("spike/count",))
    spike_steps = [step for (step, value), (_, prev) in zip(counts[1:], counts) if value > prev]
    spike_steps = [s for s in spike_steps if s in where and s in norms]
    ax.scatter([where[s] for s in spike_steps], [norms[s] for s in spike_steps], marker="x", color="red", zorder=3)


# ---- table ----------------------------------------------------------------------------------

TABLE_COLUMNS: dict[str, tuple[str, ...]] = {
    "final val loss": ("val/loss",),
    "spikes / 1k steps": ("spike/per_1k_steps",),
    "largest spike ratio": ("spike/max_ratio",),
    "tokens/s": CHARTS["tokens/s"],
    "MFU": ("perf/mfu",),
    "peak memory GB": ("perf/peak_memory_gb",),
}


def _summary(values: list[float]) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}"


def summary_table(groups: dict[str, list[Run]]) -> str:
    header = "| run | seeds | " + " | ".join(TABLE_COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    for label, runs in groups.items():
        cells = [_summary([run.last(tags) for run in runs]) for tags in TABLE_COLUMNS.values()]
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(groups: dict[str, list[Run]], output: Path) -> Path:
    output.mkdir(parents=True, exist_ok=True)
    lines = ["# Run comparison", "", summary_table(groups), ""]
    for title, candidates in CHARTS.items():
        file_name = re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_") + ".png"
        if plot_chart(title, candidates, groups, output / file_name):
            lines += [f"## {title}", "", f"![{title}]({file_name})", ""]
    lines += ["## Runs", ""] + [f"- `{run.label}`: `{run.path}`" for runs in groups.values() for run in runs]
    page = output / "report.md"
    page.write_text("\n".join(lines) + "\n")
    return page


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="diffv2-lit compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders, or folders holding runs")
    parser.add_argument("--output", type=Path, required=True, help="report folder (report.md + PNG charts)")
    args = parser.parse_args(argv)
    try:
        runs = [load_run(run_dir) for run_dir in find_run_dirs(args.runs)]
    except CompareError as error:
        parser.exit(2, f"diffv2-lit compare: error: {error}\n")
    page = write_report(group_runs(runs), args.output)
    print(f"compared {len(runs)} runs; report written to {page}")
    return 0
