"""The GPU suite: every GPU path checked and measured in one command, one table (issues 11 and 12).

    bash benchmarks/gpu_suite.sh                         # on a CUDA machine (one GPU), about 8 minutes
    PYTHONPATH=. python benchmarks/gpu_suite.py --dry    # the same steps at toy size on the CPU (a test runs it)

Sections, each under its own time limit so one failure cannot eat the rest:
1. kernels: logits of the SDPA (and flash-attn, if installed) path against the eager reference on the
   same device, and against an fp64 CPU reference, for the three attention variants; KV-cache decoding
   against a full forward; the loss and every gradient of one step of the chunked loss and, on CUDA, of
   liger-kernel's RMSNorm + SwiGLU and fused loss, against the PyTorch path.
2. training: `diffv2-lit fit` in a subprocess, as users run it: the 125m twins under every hardware
   fragment that fits one GPU (FSDP2, `1gpu` bf16-mixed, FSDP1, DDP with one process), with compile off
   and on under FSDP2, then the 1.3b twins; tokens/s, MFU, peak memory and the last loss read back from
   the run's TensorBoard events. Data: the built-in corpus (byte tokenizer, prepared once).
3. decode: ms/token of KV-cache decoding at the 125m shape, batch 1 and 16, eager (a growing cache) and
   cuda-graphs (a static cache and a captured one-token step), DIFF V2 / baseline, and the greedy tokens of
   both modes compared.
4. ablation (not in the default sections; `--sections ablation`): the speed levers of the GPU recipes, each
   on and off in one table (compile, the fused output layer + loss, liger's RMSNorm + SwiGLU kernels with
   and without compile), DIFF V2 against the baseline's FLOP rate.

Every row says `ok` or what failed (the first line of the error); the exit code is 1 if any row failed.
`--dry` shrinks everything (a one-layer quickstart model for kernels and decode, a few steps of the
quickstart recipes, CPU twins of the fragments) so the whole script runs inside the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from diffv2_lit.model import ModelConfig, Transformer  # noqa: E402
from diffv2_lit.inference.decoding import shared_decoder  # noqa: E402
from diffv2_lit.training.cpu_twin import single_device_fragment  # noqa: E402  (shared with the CPU matrix test)

VARIANTS = ("baseline", "diffv2", "diffv1")
# --dry's model shape for the kernels and decode sections: one small layer, so the dry run checks that every
# section runs and reports (the model tests check the numbers at more shapes), in seconds.
DRY_SHAPE = dict(n_layers=1, dim=64, n_heads=4, n_kv_heads=2)


def section_shape(dry: bool) -> dict:
    return DRY_SHAPE if dry else {}


# ----------------------------------------------------------------------------------------------
# Plan: what runs, at full size and in --dry
# ----------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    name: str
    recipe: str                  # recipes/<recipe>.yaml
    fragment: str | None = None  # configs/hardware/<fragment>.yaml, made single-device
    steps: int = 60
    extra: list[str] = field(default_factory=list)
    throughput_every: int = 10   # ThroughputMFU's window, in optimizer steps
    count_syncs: bool = False    # host syncs per optimizer step (benchmarks/sync_count.py, issue 20)


def ablation_plan(dry: bool) -> list[TrainingRun]:
    """Each lever of the GPU recipes on and off, at recipe settings otherwise (FSDP2 on one GPU)."""
    if dry:
        return [TrainingRun("quickstart-diffv2 loss chunked", "quickstart", "8gpu-fsdp2", steps=6, throughput_every=2,
                            extra=["--model.loss_impl", "chunked"], count_syncs=True)]
    runs = []
    for size, steps in (("125m", 60), ("1.3b", 30)):
        one_step = ["--trainer.accumulate_grad_batches", "1"]
        runs.append(TrainingRun(f"{size}-baseline recipe", f"{size}-baseline", "8gpu-fsdp2", steps, one_step,
                                count_syncs=True))
        runs.append(TrainingRun(f"{size}-diffv2 recipe", f"{size}-diffv2", "8gpu-fsdp2", steps, one_step,
                                count_syncs=True))
        runs.append(TrainingRun(f"{size}-diffv2 compile off", f"{size}-diffv2", "8gpu-fsdp2", steps,
                                one_step + ["--model.parallel.compile", "false"]))
        for impl in ("plain", "chunked", "liger"):
            runs.append(TrainingRun(f"{size}-diffv2 loss {impl}", f"{size}-diffv2", "8gpu-fsdp2", steps,
                                    one_step + ["--model.loss_impl", impl]))
        # fused RMSNorm + SwiGLU: liger's kernels with and without compile, against compile's own fusion
        runs.append(TrainingRun(f"{size}-diffv2 kernels liger", f"{size}-diffv2", "8gpu-fsdp2", steps,
                                one_step + ["--model.kernels", "liger"]))
        runs.append(TrainingRun(f"{size}-diffv2 kernels liger, compile off", f"{size}-diffv2", "8gpu-fsdp2", steps,
                                one_step + ["--model.kernels", "liger", "--model.parallel.compile", "false"]))
        for recipe in ("tensorwise", "rowwise"):  # torchao float8 projections (issue 23.4)
            runs.append(TrainingRun(f"{size}-diffv2 float8 {recipe}", f"{size}-diffv2", "8gpu-fsdp2", steps,
                                    one_step + ["--model.float8", recipe]))
    return runs


def flop_rate_rows(rows: list[dict]) -> list[dict]:
    """DIFF V2's achieved FLOP rate / the baseline's, both at recipe settings (MFU counts each one's FLOPs)."""
    by_name = {row["run"]: row for row in rows}
    ratios = []
    for size in ("125m", "1.3b", "quickstart"):
        base, diff = by_name.get(f"{size}-baseline recipe"), by_name.get(f"{size}-diffv2 recipe")
        if base and diff and base.get("mfu") and diff.get("mfu"):
            ratios.append({"run": f"{size}: DIFF V2 / baseline FLOP rate", "ratio": diff["mfu"] / base["mfu"],
                           "status": "ok"})
    return ratios


def training_plan(dry: bool) -> list[TrainingRun]:
    if dry:  # one autocast run, measuring throughput every 2 steps (the ablation's dry run is under FSDP2)
        # fused AdamW as on CUDA: the CPU's for-loop AdamW reads each parameter's step counter with .item()
        return [TrainingRun("quickstart-baseline 1gpu", "quickstart-baseline", "1gpu", steps=6, throughput_every=2,
                            extra=["--model.fused_adamw", "true"], count_syncs=True)]
    runs = []
    eager = ["--model.parallel.compile", "false"]  # the fragments are checked without compilation, which costs a minute a run
    for fragment in ("8gpu-fsdp2", "1gpu", "8gpu-fsdp1", "8gpu-ddp"):
        for variant in ("baseline", "diffv2"):
            runs.append(TrainingRun(f"125m-{variant} {fragment}", f"125m-{variant}", fragment, steps=60, extra=eager))
    for variant in ("baseline", "diffv2"):  # the recipes as they are: compile on
        runs.append(TrainingRun(f"125m-{variant} 8gpu-fsdp2 compile", f"125m-{variant}", "8gpu-fsdp2", steps=60))
    for variant in ("baseline", "diffv2"):
        runs.append(TrainingRun(f"1.3b-{variant} 8gpu-fsdp2 compile", f"1.3b-{variant}", "8gpu-fsdp2", steps=30,
                                extra=["--trainer.accumulate_grad_batches", "1"]))
    return runs


# ----------------------------------------------------------------------------------------------
# 1. kernels
# ----------------------------------------------------------------------------------------------


def kernel_rows(device: torch.device, dry: bool) -> list[dict]:
    rows = []
    backends = ["sdpa"] + (["flash"] if device.type == "cuda" and _flash_available() else [])
    for variant in VARIANTS:
        config = ModelConfig.from_preset("quickstart", attention=variant, max_seq_len=256, **section_shape(dry))
        reference = _model(config, "cpu", torch.float64, "eager")
        ids = torch.randint(0, config.vocab_size, (2, 64 if dry else 256), generator=torch.Generator().manual_seed(0))
        expected = reference(ids).float()
        for backend in backends:
            for dtype in ((torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)):
                rows.append(_kernel_row(config, reference, ids, expected, device, dtype, backend))
    return rows + step_rows(device, dry)


def step_rows(device: torch.device, dry: bool) -> list[dict]:
    """Loss and every gradient of one step, each fast path against the PyTorch reference on the same device:
    `model.loss_impl=chunked`, and on CUDA liger-kernel's `model.kernels=liger` (RMSNorm and SwiGLU) and
    `model.loss_impl=liger` (output layer + cross-entropy). liger is Triton on CUDA only."""
    from diffv2_lit.model.fused import kernels_problem, use_kernels

    liger_problem = kernels_problem("liger", "cuda") if device.type == "cuda" else None
    if liger_problem:
        return [{"variant": "all", "path": "liger", "status": f"FAILED: {liger_problem} (benchmarks/fetch_gpu_wheels.sh)"}]
    rows = []
    for variant in VARIANTS:
        config = ModelConfig.from_preset("quickstart", attention=variant, max_seq_len=256, **section_shape(dry))
        ids = torch.randint(0, config.vocab_size, (2, 64 if dry else 256), generator=torch.Generator().manual_seed(1))
        for dtype in ((torch.float32,) if device.type == "cpu" else (torch.float32, torch.bfloat16)):
            reference = _model(config, device, dtype, "sdpa")
            paths = [("chunked loss", reference, "chunked")]
            if device.type == "cuda":
                fused = _model(config, device, dtype, "sdpa", like=reference)
                use_kernels(fused, "liger")
                paths += [("liger kernels", fused, "plain"), ("liger loss", reference, "liger")]
            for name, model, loss_impl in paths:
                rows.append(_step_row(variant, name, dtype, reference, model, loss_impl, ids.to(device)))
    return rows


def _step_row(variant, name, dtype, reference, model, loss_impl, ids) -> dict:
    """Loss and gradients of `model` with `loss_impl` against `reference` with the plain loss, as the worst
    relative difference over the loss and all parameter gradients."""
    inputs, targets = ids[:, :-1], ids[:, 1:]
    results = []
    for candidate, impl in ((reference, "plain"), (model, loss_impl)):
        candidate.zero_grad(set_to_none=True)
        loss = candidate(inputs, targets=targets, loss_impl=impl)
        loss.backward()
        results.append([loss.detach().float()] + [p.grad.float() for p in candidate.parameters()])
    worst = max(((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()
                for want, got in zip(*results))
    # fp32 is the correctness check: summation order alone moves DIFF V1's lambda gradients (sums of terms
    # that nearly cancel) by 1e-4 relative, a wrong kernel by O(1). bf16 only catches gross errors.
    tolerance = 1e-3 if dtype == torch.float32 else 1e-1
    status = "ok" if worst < tolerance else f"FAILED: relative |diff| {worst:.3g} >= {tolerance}"
    return {"variant": variant, "path": name, "dtype": str(dtype).removeprefix("torch."),
            "step_vs_torch": worst, "status": status}


def _kernel_row(config, reference, ids, expected, device, dtype, backend) -> dict:
    row = {"variant": config.attention, "backend": backend, "dtype": str(dtype).removeprefix("torch.")}
    model = _model(config, device, dtype, backend, like=reference)
    eager = _model(config, device, dtype, "eager", like=reference)
    with torch.no_grad():
        fast = model(ids.to(device)).float().cpu()
        row["vs_eager"] = (fast - eager(ids.to(device)).float().cpu()).abs().max().item()
        row["vs_cpu_fp64"] = (fast - expected).abs().max().item()
        cache = model.new_cache(ids.shape[0], ids.shape[1])
        pieces = [model(ids[:, :16].to(device), cache)] + [model(ids[:, t:t + 1].to(device), cache)
                                                          for t in range(16, ids.shape[1])]
        row["decode_vs_full"] = (torch.cat(pieces, 1).float().cpu() - fast).abs().max().item()
    tolerance = 1e-3 if dtype == torch.float32 else 0.25  # bf16 logits of a random model: ~1e-1
    worst = max(row["vs_eager"], row["decode_vs_full"])
    row["status"] = "ok" if worst < tolerance else f"FAILED: max |diff| {worst:.3g} >= {tolerance}"
    return row


def _model(config: ModelConfig, device, dtype, backend: str, like: Transformer | None = None) -> Transformer:
    model = Transformer(config.replace(attn_backend=backend))
    if like is None:
        torch.manual_seed(0)
        model.init_weights()
    else:
        model.load_state_dict(like.state_dict())
    return model.to(device=device, dtype=dtype).eval()


def _flash_available() -> bool:
    from diffv2_lit.model.config import flash_attn_available

    return flash_attn_available()


# ----------------------------------------------------------------------------------------------
# 2. training, through the console script
# ----------------------------------------------------------------------------------------------


def measured_recipe(run: TrainingRun, out: Path) -> Path:
    """The recipe with ThroughputMFU's window set (a list entry, which a command-line flag cannot reach)."""
    recipe = yaml.safe_load((ROOT / "recipes" / f"{run.recipe}.yaml").read_text())
    for callback in recipe["trainer"]["callbacks"]:
        if callback["class_path"].endswith("ThroughputMFU"):
            callback.setdefault("init_args", {})["log_every_n_steps"] = run.throughput_every
    out.write_text(yaml.safe_dump(recipe))
    return out


def training_row(run: TrainingRun, workdir: Path, accelerator: str, timeout: float) -> dict:
    row = {"run": run.name, "steps": run.steps}
    run_dir = workdir / run.name.replace(" ", "_")
    run_dir.mkdir(parents=True, exist_ok=True)
    args = ["fit", "--config", str(measured_recipe(run, run_dir / "recipe.yaml"))]
    if run.fragment:
        fragment = ROOT / "configs" / "hardware" / f"{run.fragment}.yaml"
        args += ["--config", str(single_device_fragment(fragment, accelerator, run_dir / "hardware.yaml"))]
    args += ["--trainer.max_steps", str(run.steps), "--trainer.log_every_n_steps", "1",
             "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
             "--data.init_args.data_dir", "builtin:shakespeare", "--data.init_args.tokenizer", "byte",
             "--data.init_args.val_tokens", "65536", "--data.init_args.num_workers", "2", *run.extra]
    syncs = run_dir / "syncs.json"
    if run.count_syncs:
        args += ["--trainer.callbacks+=benchmarks.sync_count.CountHostSyncs", f"--trainer.callbacks.out={syncs}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LITDATA_DISABLE_VERSION_CHECK": "1", "DIFFV2_LIT_CACHE": str(workdir / "corpus-cache")}
    start = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "diffv2_lit", *args], cwd=run_dir, env=env,
                                capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": f"FAILED: timed out after {timeout:.0f} s"}
    row["wall_s"] = time.perf_counter() - start
    if result.returncode != 0:
        return {**row, "status": "FAILED: " + _last_error_line(result.stdout + result.stderr)}
    if run.count_syncs:
        per_step = list(json.loads(syncs.read_text())["per_step"].values())
        row["host_syncs_per_step"] = statistics.median(per_step) if per_step else math.nan
    return {**row, **_read_metrics(run_dir / "runs"), "status": "ok"}


def _read_metrics(runs: Path) -> dict:
    from diffv2_lit.compare import find_run_dirs, load_run

    run = load_run(find_run_dirs([runs])[-1])  # the newest version folder

    def steady(tag):  # median of the windows after the first (which holds compilation and warm-up)
        values = [value for _, value in run.series((tag,))]
        return statistics.median(values[1:] or values) if values else math.nan

    peak = [value for _, value in run.series(("perf/peak_memory_gb",))] or [math.nan]
    last_loss = run.last(("train/loss",))
    return {"tokens_per_s": steady("perf/tokens_per_sec"), "mfu": steady("perf/mfu"), "peak_gb": max(peak),
            "last_loss": math.nan if last_loss is None else last_loss}


def _last_error_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if "Error" in line or "error:" in line]
    return (lines[-1] if lines else text.strip().splitlines()[-1] if text.strip() else "no output")[:200]


# ----------------------------------------------------------------------------------------------
# 3. decode
# ----------------------------------------------------------------------------------------------


def decode_rows(device: torch.device, dry: bool) -> list[dict]:
    shape, prompt, new = ("quickstart", 32, 16) if dry else ("125m", 512, 128)
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    captured = "cuda-graphs" if device.type == "cuda" else "static"  # compiling on a CPU costs more than it saves
    rows = []
    for batch in (1, 16):
        seconds, tokens = {}, {}
        for variant in ("baseline", "diffv2"):
            config = ModelConfig.from_preset(shape, attention=variant, attn_backend="auto", **section_shape(dry))
            model = _model(config, device, dtype, "auto")
            ids = torch.randint(0, config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
            for decode in ("eager", captured):
                seconds[variant, decode], tokens[variant, decode] = _decode(model, ids.to(device), new, decode)
        for variant, decode in seconds:
            same = torch.equal(tokens[variant, decode], tokens[variant, "eager"])
            rows.append({"shape": shape, "batch": batch, "variant": variant, "decode": decode,
                         "ms_per_token": 1000 * seconds[variant, decode] / new,
                         "vs_baseline": seconds["baseline", decode] / seconds[variant, decode],
                         "vs_eager": seconds[variant, "eager"] / seconds[variant, decode],
                         "status": "ok" if same else "FAILED: greedy tokens differ from eager decoding"})
    return rows


@torch.no_grad()
def _decode(model: Transformer, ids: torch.Tensor, new: int, decode: str) -> tuple[float, torch.Tensor]:
    """(seconds for the `new` decode steps after the prefill, the greedy tokens)."""
    decode = shared_decoder(model, decode)
    model.generate(ids, 4, temperature=0, decode=decode)  # warm-up: compilation, graph capture, kernel choice
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    model.generate(ids, 1, temperature=0, decode=decode)  # the prefill alone, timed to subtract it
    _sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, new + 1, temperature=0, decode=decode)
    _sync(device)
    return time.perf_counter() - start - prefill, out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def section(name: str, function, *args) -> list[dict]:
    start = time.perf_counter()
    print(f"== {name} ...", flush=True)
    try:
        rows = function(*args)
    except Exception as err:  # a section that breaks is a row that says so, not a lost suite
        rows = [{"status": f"FAILED: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]}]
    print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def markdown(title: str, rows: list[dict]) -> str:
    if not rows:
        return f"\n### {title}\n\n(none)\n"
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = [f"\n### {title}\n", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def environment() -> str:
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    import lightning

    return (f"{time.strftime('%Y-%m-%d')}, {device}, torch {torch.__version__}, lightning {lightning.__version__}, "
            f"python {platform.python_version()}")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry", action="store_true", help="toy sizes on the CPU (the test suite runs this)")
    parser.add_argument("--sections", default="kernels,training,decode",
                        help="comma-separated: kernels, training, decode, ablation (issue 12's speed levers)")
    parser.add_argument("--run-timeout", type=float, default=240.0, help="seconds per training run")
    parser.add_argument("--workdir", default=None, help="where runs write (default: a temporary folder)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry or not torch.cuda.is_available() else "cuda")
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")
    chosen = args.sections.split(",")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu-suite-"))
    accelerator = "cpu" if device.type == "cpu" else "gpu"
    results = {}
    if "kernels" in chosen:
        results["kernels"] = section("kernels", kernel_rows, device, args.dry)
    if "training" in chosen:
        results["training"] = section("training", lambda: [training_row(run, workdir, accelerator, args.run_timeout)
                                                           for run in training_plan(args.dry)])
    if "decode" in chosen:
        results["decode"] = section("decode", decode_rows, device, args.dry)
    if "ablation" in chosen:
        rows = section("ablation", lambda: [training_row(run, workdir, accelerator, args.run_timeout)
                                            for run in ablation_plan(args.dry)])
        results["ablation"] = rows + flop_rate_rows(rows)
    report = f"\n## GPU suite ({environment()})\n" + "".join(markdown(k, v) for k, v in results.items())
    print(report)
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": environment(), **results}, indent=1))
    failed = [row for rows in results.values() for row in rows if not str(row.get("status", "")).startswith("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
