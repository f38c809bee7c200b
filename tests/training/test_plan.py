"""`diffv2-lit plan`: each GPU recipe on its hardware fragment fits (exit 0), the multi-node job's overrides
keep the recipe's tokens per step and validation cadence, and a configuration that would not fit exits 1
naming the term to change. In process (the parse is fit's LightningCLI parser; no model on a device)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from diffv2_lit.cli import plan
from diffv2_lit.model import count_parameters, resolve_model_config

ROOT = Path(__file__).parents[2]
GPU_RECIPES = sorted(p for p in ROOT.glob("recipes/*.yaml") if not p.stem.startswith("quickstart"))
FSDP2 = str(ROOT / "configs/hardware/8gpu-fsdp2.yaml")
MULTINODE = str(ROOT / "configs/hardware/multinode.yaml")


def _plan(capsys, *args: str) -> tuple[int, str, str]:
    code = plan.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _line(out: str, label: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(label))[len(label):].strip()


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_every_gpu_recipe_fits_its_hardware_fragment(capsys, path):
    code, out, err = _plan(capsys, "--config", str(path), "--config", FSDP2)
    assert code == 0, err
    peak = float(re.search(r"^peak per GPU: ([\d.]+) GiB$", out, re.M).group(1))
    assert peak <= 74.5
    terms = re.findall(r"^  (states|gathered parameters|accumulated gradients|activations|logits|overhead) +([\d.]+) GiB",
                       out, re.M)
    assert [name for name, _ in terms] == ["states", "gathered parameters", "accumulated gradients", "activations",
                                           "logits", "overhead"]
    assert sum(float(v) for _, v in terms) == pytest.approx(peak, abs=0.35)  # rounded to 0.1 each
    stated = int(re.search(r"^# memory_gib: (\d+)$", path.read_text(), re.M).group(1))
    assert peak <= stated < peak + 1  # the recipe's comment quotes this plan (rounded up)


def test_plan_prints_what_the_run_would_do(capsys):
    """The 6.7b recipe, counted by hand: 8 GPUs x 16 sequences x 2048 tokens x 8 micro-batches."""
    code, out, _ = _plan(capsys, "--config", str(ROOT / "recipes/6.7b-diffv2.yaml"), "--config", FSDP2)
    assert code == 0
    n_params = count_parameters(resolve_model_config({"preset": "6.7b", "attention": "diffv2"}))["total"]
    assert _line(out, "parameters").startswith(f"{n_params:,} ")
    assert _line(out, "world size").startswith("8 (1 node(s) x 8 device(s)), FSDP2")
    assert _line(out, "micro-batch").startswith("16 sequences x 2048 tokens")
    assert _line(out, "accumulation").startswith("8 ")
    assert _line(out, "tokens per step").startswith(f"{8 * 16 * 2048 * 8:,} ")
    assert _line(out, "validation").startswith("every 1000 optimizer steps")
    assert _line(out, "total tokens").startswith(f"{67000 * 8 * 16 * 2048 * 8 / 1e9:.1f}B")
    # The recipe reduce-scatters every micro-batch: no unsharded gradients kept between micro-batches.
    assert re.search(r"^  accumulated gradients +0\.0 GiB", out, re.M)


@pytest.mark.parametrize("recipe", ["1.3b-diffv2", "6.7b-diffv2"])
def test_the_multinode_job_keeps_tokens_per_step_and_validation_cadence(capsys, recipe):
    """examples/slurm_multinode.sbatch: 2 nodes x 8 GPUs, accumulation halved (8 -> 4) to keep the global batch."""
    path = str(ROOT / "recipes" / f"{recipe}.yaml")
    _, single, _ = _plan(capsys, "--config", path, "--config", FSDP2)
    code, multi, err = _plan(capsys, "--config", path, "--config", MULTINODE, "--trainer.accumulate_grad_batches", "4")
    assert code == 0, err
    assert _line(multi, "world size").startswith("16 (2 node(s) x 8 device(s))")
    assert _line(multi, "accumulation").startswith("4 ")
    assert _line(multi, "tokens per step").split()[0] == _line(single, "tokens per step").split()[0]
    assert _line(multi, "validation").startswith("every 1000 optimizer steps")
    assert _line(multi, "total tokens").split()[0] == _line(single, "total tokens").split()[0]


def test_global_batch_size_sets_the_accumulation_as_fit_does(capsys):
    code, out, _ = _plan(capsys, "--config", str(ROOT / "recipes/760m-diffv2.yaml"), "--config", FSDP2,
                         "--trainer.accumulate_grad_batches", "1", "--global_batch_size", "512")
    assert code == 0
    assert _line(out, "accumulation").startswith("8 ")  # 512 / (8 sequences x 8 GPUs)
    assert _line(out, "validation").startswith("every 1000 optimizer steps")


def test_a_run_that_does_not_fit_exits_1_naming_the_term(capsys):
    """The 6.7b recipe as it was before (no-sync accumulation over 8 micro-batches): its unsharded fp32
    gradients, 4 bytes x N on every GPU, push it past 80 GB."""
    recipe = str(ROOT / "recipes/6.7b-diffv2.yaml")
    code, out, err = _plan(capsys, "--config", recipe, "--config", FSDP2, "--model.parallel.fsdp_sync_every_micro_batch", "false")
    assert code == 1
    n_params = count_parameters(resolve_model_config({"preset": "6.7b", "attention": "diffv2"}))["total"]
    accumulated = float(re.search(r"^  accumulated gradients +([\d.]+) GiB", out, re.M).group(1))
    assert accumulated == pytest.approx(4 * n_params / 2**30, abs=0.05)
    assert float(re.search(r"^peak per GPU: ([\d.]+) GiB$", out, re.M).group(1)) > 74.5
    assert "exceeds --gpu_memory_gib 74.5; change accumulated gradients" in err
    assert "--model.parallel.fsdp_sync_every_micro_batch true" in err
    # A larger card takes it.
    code, _, _ = _plan(capsys, "--config", recipe, "--config", FSDP2, "--model.parallel.fsdp_sync_every_micro_batch", "false",
                       "--gpu_memory_gib", "130")
    assert code == 0


def test_activations_are_named_when_they_are_what_to_change(capsys):
    code, _, err = _plan(capsys, "--config", str(ROOT / "recipes/1.3b-diffv2.yaml"), "--config", FSDP2,
                         "--data.init_args.batch_size", "32", "--trainer.accumulate_grad_batches", "2")
    assert code == 1
    assert "change activations" in err and "--model.parallel.activation_checkpointing true" in err


def test_a_configuration_mistake_is_one_line_and_exit_2(capsys):
    code, _, err = _plan(capsys, "--config", str(ROOT / "recipes/quickstart.yaml"), "--trainer.devices", "auto")
    assert code == 2 and "trainer.devices" in err and len(err.strip().splitlines()) == 1


def test_the_console_script_runs_plan():
    """`diffv2-lit plan` through the real entry point, on the CPU recipe (the quickstart fits a laptop)."""
    result = subprocess.run([sys.executable, "-m", "diffv2_lit", "plan", "--config", "recipes/quickstart.yaml"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    assert re.search(r"^peak per GPU: [\d.]+ GiB$", result.stdout, re.M)
    assert "Seed set" not in result.stdout + result.stderr


def _docs_row(path: Path) -> str:
    p = plan.plan_from_config(plan._parse(["--config", str(path), "--config", FSDP2]))
    layout, terms = p.layout, p.memory.terms()
    mode = "-" if layout.accumulation == 1 else "every micro-batch" if layout.sync_every_micro_batch else "once per step"
    return (f"| {path.stem} | {p.n_parameters / 1e6:,.0f}M | {layout.micro_batch} x {layout.accumulation}"
            f"{', AC' if layout.activation_checkpointing else ''} | {mode} | {p.tokens_per_step:,} | "
            + " | ".join(f"{v / 2**30:.1f}" for v in terms.values()) + f" | **{p.memory.total / 2**30:.1f}** |")


def test_docs_show_what_plan_prints(capsys):
    """docs/training.md's example output and per-recipe memory table are the command's own numbers."""
    docs = (ROOT / "docs" / "training.md").read_text()
    for path in GPU_RECIPES:
        assert _docs_row(path) in docs, f"docs/training.md's memory table should hold:\n{_docs_row(path)}"
    _, out, _ = _plan(capsys, "--config", str(ROOT / "recipes/6.7b-diffv2.yaml"), "--config", FSDP2)
    example = docs[docs.index("## Plan a run"):]
    example = example[example.index("```text\n") + 8:]
    assert example[:example.index("```")].strip() == out.strip()
