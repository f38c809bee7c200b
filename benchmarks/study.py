"""The small-scale comparison study: does DIFF V2's gain survive a modern baseline?

For every cell (arm, optimizer, peak LR) and seed it trains the quickstart recipe (recipes/quickstart.yaml:
4 layers x D=128 on the built-in Shakespeare corpus, byte tokenizer, CPU, fp32) with only the arm's
architecture, the optimizer, the peak LR, the seed, the step count and document masking changed, one
process at a time, then runs `diffv2-lit compare` over all runs and writes `summary.md`: validation loss
mean ± std and per seed, loss at equal wall-clock, spikes per 1k steps, tokens/s and the DIFF monitor's
statistics, with a verdict of whether each difference from the baseline lies inside the seed noise.
Runs already finished are skipped, so rerunning the same command resumes a study that was interrupted.

    # the grid of issue 22 (docs/study/ holds what ran of it: see docs/study/README.md)
    python benchmarks/study.py --steps 1200 --seeds 1 2 3 --out runs/study-22 --report docs/study/grid22
    # the earlier study (DIFF V1 included, no document masking): docs/study/steps400
    python benchmarks/study.py --arms baseline diffv2 diffv1 control-baseline --optimizers adamw \
        --lrs 3e-3 5e-2 --stress-arms --no-document-mask --steps 400 --val-every 100 --val-tokens 8192 \
        --out runs/study-400 --report docs/study/steps400

The default grid: the arms baseline, baseline + QK-norm, the 1.5h-head control and DIFF V2, each with
AdamW and with Muon at the recipe's LR (3e-3; Muon's matrices at its own `muon_lr`), plus the high-LR
stress (AdamW at 5e-2) for baseline, baseline + QK-norm and DIFF V2; document masking on.

Each run gets a derived config written next to its logs (`<out>/configs/<name>.yaml`): the recipe with
the overrides applied, and with the SampleText callback and checkpoints dropped (they cost time and the
study reads only the TensorBoard scalars). The DiffMonitor and GradientSpikeDetector stay: λ, context
RMS, sink mass and gradient spikes are what the study is about.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"

# arm name -> model.architecture. The names carry the attention variant so that `compare` labels them
# as-is and groups seeds by the trailing `-seedN`.
ARMS: dict[str, dict] = {
    "baseline": {"preset": "quickstart", "attention": "baseline"},
    "baseline-qknorm": {"preset": "quickstart", "attention": "baseline", "qk_norm": True},
    "control-baseline": {"preset": "quickstart-control", "attention": "baseline"},  # 1.5h heads, parameter-matched
    "diffv2": {"preset": "quickstart", "attention": "diffv2"},
    "diffv1": {"preset": "quickstart", "attention": "diffv1"},
}
OPTIMIZERS = ("adamw", "muon")
# In this order within each seed and optimizer: an interrupted study holds the headline pair first.
DEFAULT_ARMS = ["baseline", "diffv2", "baseline-qknorm", "control-baseline"]
DEFAULT_STRESS_ARMS = ["baseline", "diffv2", "baseline-qknorm"]
REFERENCE_ARM = "baseline"  # every other arm is compared with it at the same optimizer and LR
DROP_CALLBACKS = ("SampleText", "ModelCheckpoint")


@dataclass(frozen=True)
class Cell:
    """One arm trained with one optimizer at one peak LR; a run is a cell at one seed."""
    arm: str
    optimizer: str
    lr: float

    @property
    def name(self) -> str:
        return f"{self.arm}-{self.optimizer}-lr{lr_tag(self.lr)}"


def lr_tag(lr: float) -> str:
    """3e-3 -> '3e-3', 0.02 -> '2e-2' (a stable, short spelling for run names)."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}" if float(f"{lr:.0e}") == lr else f"{lr:g}"


def run_name(cell: Cell, seed: int) -> str:
    return f"{cell.name}-seed{seed}"


def derived_config(recipe: dict, cell: Cell, seed: int, steps: int, out: Path, val_every: int, val_tokens: int,
                   document_mask: bool) -> dict:
    """The recipe with this run's overrides; everything else (schedule, betas, data order) unchanged."""
    config = copy.deepcopy(recipe)
    config["seed_everything"] = seed
    trainer = config["trainer"]
    trainer["max_steps"] = steps
    trainer["val_check_interval"] = val_every
    trainer["enable_checkpointing"] = False
    save_dir = os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else str(out)  # the fit runs in ROOT
    trainer["logger"]["init_args"] = {"save_dir": save_dir, "name": run_name(cell, seed), "version": 0}
    trainer["callbacks"] = [cb for cb in trainer["callbacks"]
                            if not any(cb["class_path"].endswith(name) for name in DROP_CALLBACKS)]
    config["model"]["architecture"] = dict(ARMS[cell.arm])
    config["model"]["lr"] = cell.lr
    if cell.optimizer != "adamw":  # the recipe's default; left out so AdamW configs read as the recipe
        config["model"]["optimizer"] = cell.optimizer
    config["data"]["init_args"]["val_tokens"] = val_tokens
    config["data"]["init_args"]["document_mask"] = document_mask
    return config


def fit_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "diffv2_lit", "fit", "--config", str(config_path)]


def is_finished(out: Path, name: str) -> bool:
    return (out / name / "version_0" / "STUDY_DONE").is_file()


def versions(threads: int | None) -> dict[str, str]:
    import lightning
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "platform": platform.platform(), "cpu cores": str(os.cpu_count()),
            "torch threads per run": str(threads or torch.get_num_threads())}


def plan(cells: list[Cell], seeds: list[int]) -> list[tuple[Cell, int]]:
    # Seed-major order: an interrupted study still holds every cell at the first seeds.
    return [(cell, seed) for seed in seeds for cell in cells]


def grid(arms: list[str], optimizers: list[str], lrs: list[float], stress_arms: list[str],
         stress_lrs: list[float]) -> list[Cell]:
    """The main grid (every arm x optimizer x LR) and then the AdamW high-LR stress cells."""
    cells = [Cell(arm, optimizer, lr) for lr in lrs for optimizer in optimizers for arm in arms]
    cells += [Cell(arm, "adamw", lr) for lr in stress_lrs for arm in stress_arms]
    return list(dict.fromkeys(cells))


# ---- the summary -------------------------------------------------------------------------------

MONITOR_TAGS = {
    "λ mean (V2: sigmoid(λ); V1: λ)": "diff/lambda_mean",
    "context RMS mean": "diff/context_rms_mean",
    "normalised context RMS p05": "diff/context_rms_norm_p05",
    "below-floor fraction": "diff/below_floor_frac",
    "sink mass": "diff/sink_mass",
    "max attention logit (peak)": "diff/max_logit_peak",
    "max abs hidden (peak)": "diff/max_hidden_peak",
}


@dataclass
class RunFigures:
    """What the summary reads from one finished run's event file."""
    name: str
    cell: str
    val_loss: float
    val_curve: list[tuple[float, float]]  # (seconds since the run's first logged scalar, val loss)
    seconds: float  # first to last logged scalar
    steps: int
    spikes: float
    largest_spike_ratio: float | None
    tokens_per_sec: float | None  # median over the run's ThroughputMFU readings
    monitor: dict[str, float | None]


def read_run(run_dir: Path, cell: str) -> RunFigures | None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    if "val/loss" not in tags:
        return None
    everything = [e for tag in tags for e in events.Scalars(tag)]
    start = min(e.wall_time for e in everything)

    def last(tag: str) -> float | None:
        return events.Scalars(tag)[-1].value if tag in tags else None

    val = events.Scalars("val/loss")
    speed = [e.value for e in events.Scalars("perf/tokens_per_sec")] if "perf/tokens_per_sec" in tags else []
    return RunFigures(
        name=run_dir.parent.name, cell=cell, val_loss=val[-1].value,
        val_curve=[(e.wall_time - start, e.value) for e in val],
        seconds=max(e.wall_time for e in everything) - start, steps=max(e.step for e in everything) + 1,
        spikes=last("spike/count") or 0.0, largest_spike_ratio=last("spike/max_ratio"),
        tokens_per_sec=statistics.median(speed) if speed else None,
        monitor={label: last(tag) for label, tag in MONITOR_TAGS.items()})


def loss_at(curve: list[tuple[float, float]], seconds: float) -> float | None:
    """Validation loss at `seconds` into the run, linear between validations (None past the run's last one)."""
    for (t0, v0), (t1, v1) in zip(curve, curve[1:]):
        if t0 <= seconds <= t1:
            return v0 + (v1 - v0) * (seconds - t0) / max(t1 - t0, 1e-9)
    return curve[0][1] if curve and seconds <= curve[0][0] else None


def mean_std(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def short(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3f}"


def noise_verdict(runs: list[RunFigures], reference: list[RunFigures]) -> str:
    """Δ mean val loss against the reference cell, and whether it is outside twice the seeds' spread.

    The rule (|Δ| > 2 x the pooled standard deviation of one seed's loss) is deliberately plain: with
    3 seeds per cell no significance test has much power, and the table shows every seed anyway."""
    ours, theirs = [r.val_loss for r in runs], [r.val_loss for r in reference]
    delta = statistics.fmean(ours) - statistics.fmean(theirs)
    if len(ours) < 2 or len(theirs) < 2:
        return f"{delta:+.3f} (one seed: noise unknown)"
    pooled = math.sqrt((statistics.variance(ours) + statistics.variance(theirs)) / 2)
    inside = abs(delta) <= 2 * pooled
    return f"{delta:+.3f} ({'inside' if inside else 'outside'} the seed noise, 2σ = {2 * pooled:.3f})"


def summarize(figures: list[RunFigures], cells: list[Cell], command: str) -> str:
    """The Markdown summary: one row per cell, in the plan's order, and the monitor table."""
    by_cell = {cell.name: [f for f in figures if f.cell == cell.name] for cell in cells}
    by_cell = {name: sorted(runs, key=lambda r: r.name) for name, runs in by_cell.items() if runs}
    # Equal wall-clock: when the fastest cell's median run logged its last validation, so every cell has a value.
    budget = min(statistics.median(r.val_curve[-1][0] for r in runs) for runs in by_cell.values()) if by_cell else 0.0
    lines = [f"Command: `{command}`", "",
             "Validation loss (nats/byte) at the last step, mean ± std over seeds; at equal wall-clock: "
             f"interpolated at {budget:.0f} s into each run (the last validation of the fastest cell's median run). "
             "Spikes: "
             "GradientSpikeDetector defaults (factor 4, z 6). Δ: against the baseline with the same optimizer "
             "and LR; inside the seed noise when |Δ| ≤ 2 x the pooled per-seed std.", "",
             "| cell | seeds | steps | val loss | val loss per seed | Δ vs baseline | val loss @ equal wall-clock "
             "| spikes / 1k steps | largest spike ratio | tokens/s (median) | run time (s) |",
             "|---|---:|---:|---:|---|---|---:|---:|---:|---:|---:|"]
    cell_of = {cell.name: cell for cell in cells}
    for name, runs in by_cell.items():
        cell = cell_of[name]
        reference = by_cell.get(Cell(REFERENCE_ARM, cell.optimizer, cell.lr).name)
        delta = "–" if cell.arm == REFERENCE_ARM or not reference else noise_verdict(runs, reference)
        lines.append(" | ".join([
            f"| {name}", str(len(runs)), str(runs[0].steps), mean_std([r.val_loss for r in runs]),
            ", ".join(f"{r.val_loss:.3f}" for r in runs), delta,
            mean_std([loss_at(r.val_curve, budget) for r in runs]),
            mean_std([1000 * r.spikes / r.steps for r in runs], 1),
            mean_std([r.largest_spike_ratio for r in runs], 1),
            mean_std([r.tokens_per_sec for r in runs], 0), mean_std([r.seconds for r in runs], 0)]) + " |")
    lines += ["", "DIFF monitor at its last step (mean over layers, on its fixed probe batch), mean over seeds:", "",
              "| cell | " + " | ".join(MONITOR_TAGS) + " |", "|---|" + "---:|" * len(MONITOR_TAGS)]
    for name, runs in by_cell.items():
        cells_ = []
        for label in MONITOR_TAGS:
            values = [r.monitor[label] for r in runs if r.monitor[label] is not None]
            cells_.append(short(statistics.fmean(values)) if values else "–")
        lines.append(f"| {name} | " + " | ".join(cells_) + " |")
    return "\n".join(lines) + "\n"


# ---- running it --------------------------------------------------------------------------------


def train(out: Path, name: str, command: list[str], env: dict, log: Path, label: str) -> None:
    run_dir = out / name / "version_0"
    if run_dir.exists():  # an interrupted run: start it again from scratch
        import shutil

        shutil.rmtree(run_dir)
    print(f"{label} {name}: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    with log.open("a") as f:
        f.write(json.dumps({"run": name, "rc": result.returncode, "seconds": round(seconds, 1)}) + "\n")
    if result.returncode != 0:
        print(result.stderr[-4000:], file=sys.stderr)
        print(f"{label} {name}: FAILED (rc {result.returncode}) after {seconds:.0f}s", flush=True)
        return
    (run_dir / "STUDY_DONE").write_text(f"{seconds:.1f}\n")
    print(f"{label} {name}: {seconds:.0f}s", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arms", nargs="+", default=DEFAULT_ARMS, choices=list(ARMS))
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3], help="peak learning rates of the main grid")
    parser.add_argument("--stress-arms", nargs="*", default=DEFAULT_STRESS_ARMS, choices=list(ARMS),
                        help="arms of the AdamW high-LR stress (none: no stress cells)")
    parser.add_argument("--stress-lrs", nargs="+", type=float, default=[5e-2])
    parser.add_argument("--document-mask", action=argparse.BooleanOptionalAction, default=True,
                        help="data.document_mask of every run (default on)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per run")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-tokens", type=int, default=16384)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (OMP_NUM_THREADS); default: torch's own choice")
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="TensorBoard save_dir of all runs")
    parser.add_argument("--report", type=Path, default=None, help="compare report folder (default: <out>/report)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, train nothing")
    parser.add_argument("--compare-only", action="store_true",
                        help="train nothing; write the report over the runs of this plan that finished")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    out = args.out.resolve()
    config_dir = out / "configs"
    cells = grid(args.arms, args.optimizers, args.lrs, args.stress_arms, args.stress_lrs)
    runs = plan(cells, args.seeds)
    if not args.dry_run:
        config_dir.mkdir(parents=True, exist_ok=True)
        (out / "versions.json").write_text(json.dumps(versions(args.threads), indent=2) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               LITDATA_DISABLE_VERSION_CHECK="1")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for index, (cell, seed) in enumerate(runs, 1):
        name = run_name(cell, seed)
        config = derived_config(recipe, cell, seed, args.steps, out, args.val_every, args.val_tokens,
                                args.document_mask)
        config_path = config_dir / f"{name}.yaml"
        command = fit_command(config_path)
        label = f"[{index}/{len(runs)}]"
        if args.dry_run:
            print(" ".join(command))
        elif args.compare_only:
            continue
        elif is_finished(out, name):
            print(f"{label} {name}: done, skipped", flush=True)
        else:
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            train(out, name, command, env, out / "study_log.jsonl", label)
    if args.dry_run:
        return 0
    return report(args, out, cells, runs, argv)


def report(args: argparse.Namespace, out: Path, cells: list[Cell], runs: list[tuple[Cell, int]],
           argv: list[str] | None) -> int:
    from diffv2_lit.cli.compare import main as compare

    report_dir = args.report or out / "report"
    finished = [(cell, seed) for cell, seed in runs if is_finished(out, run_name(cell, seed))]
    if not finished:
        print("no run of this plan has finished: nothing to report", file=sys.stderr)
        return 1
    folders = [out / run_name(cell, seed) for cell, seed in finished]
    rc = compare([os.path.relpath(d) for d in folders] + ["--output", str(report_dir)])
    command = "python benchmarks/study.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                        if a != "--compare-only")
    info = json.loads((out / "versions.json").read_text()) if (out / "versions.json").is_file() \
        else versions(args.threads)
    header = (f"Study: `{command}`  \nVersions: Python {info['python']}, torch {info['torch']}, Lightning "
              f"{info['lightning']}; {info['platform']}, {info['cpu cores']} CPU cores, "
              f"{info.get('torch threads per run', info.get('torch threads'))} torch threads per run. "
              "Per-cell figures: [summary.md](summary.md).\n")
    page = report_dir / "report.md"
    title, _, rest = page.read_text().partition("\n")
    page.write_text(f"{title}\n\n{header}{rest}")
    figures = [f for f in (read_run(out / run_name(c, s) / "version_0", c.name) for c, s in finished) if f]
    missing = [run_name(c, s) for c, s in runs if not is_finished(out, run_name(c, s))]
    not_run = f"\nNot run (yet): {', '.join(missing)}.\n" if missing else "\nEvery run of the plan finished.\n"
    (report_dir / "summary.md").write_text("# Study summary\n\n" + summarize(figures, cells, command) + not_run
                                          + "\n## Versions\n\n" + "\n".join(f"- {k}: {v}" for k, v in info.items())
                                          + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
