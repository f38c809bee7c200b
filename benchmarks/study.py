"""The small-scale comparison study: baseline vs DIFF V2 vs DIFF V1 vs the 1.5h-head control.

For every (model, learning rate, seed) it trains the quickstart recipe (recipes/quickstart.yaml:
4 layers x D=128 on the built-in Shakespeare corpus, byte tokenizer, CPU, fp32) with only the
attention variant / preset, the peak LR, the seed and the step count changed, one process at a time,
then runs `diffv2-lit compare` over all runs. Runs already finished are skipped, so rerunning the same
command resumes a study that was interrupted.

    # what docs/study/ holds (reduced to fit the CPU time we had; see docs/study/README.md)
    python benchmarks/study.py --steps 400 --val-every 100 --val-tokens 8192 --seeds 1 2 3 --lrs 3e-3 5e-2 \
        --out runs/study-400 --report docs/study/steps400
    # the issue-sized study (about 1.5-2 hours on 2 quiet CPU cores)
    python benchmarks/study.py --steps 1200 --seeds 1 2 3 --lrs 3e-3 5e-2 --out runs/study-full --report docs/study-full

Each run gets a derived config written next to its logs (`<out>/configs/<name>.yaml`): the recipe with
the overrides applied, and with the SampleText callback and checkpoints dropped (they cost time and the
study reads only the TensorBoard scalars). The DiffMonitor and GradientSpikeDetector stay: λ, context
RMS, sink mass and gradient spikes are what the study is about.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "quickstart.yaml"

# study name -> (model preset, attention). The names carry the attention variant so that
# `compare` labels them as-is and groups seeds by the trailing `-seedN`.
MODELS: dict[str, tuple[str, str]] = {
    "baseline": ("quickstart", "baseline"),
    "diffv2": ("quickstart", "diffv2"),
    "diffv1": ("quickstart", "diffv1"),
    "control-baseline": ("quickstart-control", "baseline"),  # 1.5h heads: the parameter-matched control
}
DROP_CALLBACKS = ("SampleText", "ModelCheckpoint")


def lr_tag(lr: float) -> str:
    """3e-3 -> '3e-3', 0.02 -> '2e-2' (a stable, short spelling for run names)."""
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}" if float(f"{lr:.0e}") == lr else f"{lr:g}"


def run_name(model: str, lr: float, seed: int) -> str:
    return f"{model}-lr{lr_tag(lr)}-seed{seed}"


def derived_config(recipe: dict, model: str, lr: float, seed: int, steps: int, out: Path,
                   val_every: int, val_tokens: int) -> dict:
    """The recipe with this run's overrides; everything else (optimizer, schedule, data) unchanged."""
    preset, attention = MODELS[model]
    config = copy.deepcopy(recipe)
    config["seed_everything"] = seed
    trainer = config["trainer"]
    trainer["max_steps"] = steps
    trainer["val_check_interval"] = val_every
    trainer["enable_checkpointing"] = False
    save_dir = os.path.relpath(out, ROOT) if out.is_relative_to(ROOT) else str(out)  # the fit runs in ROOT
    trainer["logger"]["init_args"] = {"save_dir": save_dir, "name": run_name(model, lr, seed), "version": 0}
    trainer["callbacks"] = [cb for cb in trainer["callbacks"]
                            if not any(cb["class_path"].endswith(name) for name in DROP_CALLBACKS)]
    config["model"]["architecture"] = {"preset": preset, "attention": attention}
    config["model"]["lr"] = lr
    config["data"]["init_args"]["val_tokens"] = val_tokens
    return config


def fit_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "diffv2_lit", "fit", "--config", str(config_path)]


def is_finished(out: Path, name: str) -> bool:
    return (out / name / "version_0" / "STUDY_DONE").is_file()


def versions() -> dict[str, str]:
    import lightning
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "lightning": lightning.__version__,
            "platform": platform.platform(), "cpu cores": str(os.cpu_count()),
            "torch threads": str(torch.get_num_threads())}


def plan(models: list[str], lrs: list[float], seeds: list[int]) -> list[tuple[str, float, int]]:
    # Seed-major order: an interrupted study still holds every model at the first seeds.
    return [(m, lr, s) for s in seeds for lr in lrs for m in models]


SUMMARY_TAGS = {
    "val loss": "val/loss",
    "spikes (per seed)": "spike/count",
    "largest spike ratio": "spike/max_ratio",
    "λ mean (V2: sigmoid(λ); V1: λ)": "diff/lambda_mean",
    "context RMS mean": "diff/context_rms_mean",
    "context RMS p05": "diff/context_rms_p05",
    "normalised RMS p05": "diff/context_rms_norm_p05",
    "below-floor fraction": "diff/below_floor_frac",
    "sink mass": "diff/sink_mass",
    "max attention logit (peak)": "diff/max_logit_peak",
    "max abs hidden (peak)": "diff/max_hidden_peak",
}


def summarize(run_dirs: list[Path], command: str) -> str:
    """A Markdown table of the last value of each study metric, mean ± std over seeds, per group."""
    import statistics

    from diffv2_lit.compare import find_run_dirs, group_runs, load_runs

    groups = group_runs(load_runs(find_run_dirs(run_dirs)))

    def cell(values: list[float], digits: int = 3) -> str:
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.{digits}f}"
        return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"

    lines = [f"Command: `{command}`", "",
             "Last logged value of each metric, mean ± std over seeds (DiffMonitor metrics: mean over layers "
             "on the monitor's fixed probe batch; spikes: GradientSpikeDetector defaults, factor 4 / z 6).", "",
             "| run | seeds | " + " | ".join(SUMMARY_TAGS) + " | val loss per seed |",
             "|" + "---|" * (len(SUMMARY_TAGS) + 3)]
    for label, runs in sorted(groups.items()):
        cells = []
        runs = sorted(runs, key=lambda r: r.label)
        for tag in SUMMARY_TAGS.values():
            values = [v for v in (run.last((tag,)) for run in runs) if v is not None]
            cells.append(", ".join(f"{v:.0f}" for v in values) if tag == "spike/count" else cell(values))
        per_seed = ", ".join(f"{run.last(('val/loss',)):.3f}" for run in runs)
        lines.append(f"| {label} | {len(runs)} | " + " | ".join(cells) + f" | {per_seed} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--lrs", nargs="+", type=float, default=[3e-3, 5e-2], help="peak learning rates")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per run")
    parser.add_argument("--val-every", type=int, default=100)
    parser.add_argument("--val-tokens", type=int, default=16384)
    parser.add_argument("--out", type=Path, default=Path("runs/study"), help="TensorBoard save_dir of all runs")
    parser.add_argument("--report", type=Path, default=None, help="compare report folder (default: <out>/report)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, train nothing")
    parser.add_argument("--compare-only", action="store_true",
                        help="train nothing; write the report over the runs of this plan that finished")
    args = parser.parse_args(argv)

    import yaml

    recipe = yaml.safe_load(RECIPE.read_text())
    out = args.out.resolve()
    config_dir = out / "configs"
    runs = plan(args.models, args.lrs, args.seeds)
    log = out / "study_log.jsonl"
    if not args.dry_run:
        config_dir.mkdir(parents=True, exist_ok=True)
        (out / "versions.json").write_text(json.dumps(versions(), indent=2) + "\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               LITDATA_DISABLE_VERSION_CHECK="1")
    for index, (model, lr, seed) in enumerate(runs, 1):
        name = run_name(model, lr, seed)
        config = derived_config(recipe, model, lr, seed, args.steps, out, args.val_every, args.val_tokens)
        config_path = config_dir / f"{name}.yaml"
        command = fit_command(config_path)
        if args.dry_run:
            print(" ".join(command))
            continue
        if args.compare_only:
            continue
        if is_finished(out, name):
            print(f"[{index}/{len(runs)}] {name}: done, skipped", flush=True)
            continue
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        run_dir = out / name / "version_0"
        if run_dir.exists():  # an interrupted run: start it again from scratch
            import shutil

            shutil.rmtree(run_dir)
        print(f"[{index}/{len(runs)}] {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        result = subprocess.run(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
        seconds = time.perf_counter() - start
        with log.open("a") as f:
            f.write(json.dumps({"run": name, "rc": result.returncode, "seconds": round(seconds, 1)}) + "\n")
        if result.returncode != 0:
            print(result.stderr[-4000:], file=sys.stderr)
            print(f"[{index}/{len(runs)}] {name}: FAILED (rc {result.returncode}) after {seconds:.0f}s", flush=True)
            continue
        (run_dir / "STUDY_DONE").write_text(f"{seconds:.1f}\n")
        print(f"[{index}/{len(runs)}] {name}: {seconds:.0f}s", flush=True)
    if args.dry_run:
        return 0
    from diffv2_lit.cli.compare import main as compare

    report = args.report or out / "report"
    finished = [out / run_name(m, lr, s) for m, lr, s in runs if is_finished(out, run_name(m, lr, s))]
    rc = compare([os.path.relpath(d) for d in finished] + ["--output", str(report)])
    command = "python benchmarks/study.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                        if a != "--compare-only")
    info = versions()
    header = (f"Study: `{command}`  \nVersions: Python {info['python']}, torch {info['torch']}, Lightning "
              f"{info['lightning']}; {info['platform']}, {info['cpu cores']} CPU cores, {info['torch threads']} torch "
              "threads. Monitor metrics per group: [summary.md](summary.md).\n")
    page = report / "report.md"
    title, _, rest = page.read_text().partition("\n")
    page.write_text(f"{title}\n\n{header}{rest}")
    (report / "summary.md").write_text("# Study summary\n\n" + summarize(finished, command) + "\n## Versions\n\n"
                                      + "\n".join(f"- {k}: {v}" for k, v in versions().items()) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main())
