"""The README cannot drift: its preset table comes from `count_parameters`, and its commands run, in the
order it gives them, on the quickstart with few steps (GPU-only commands are listed, with the reason)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from diffv2_lit.checkpoint.safe_load import load_file
from diffv2_lit.model import ModelConfig, count_parameters
from diffv2_lit.model.generation import KVCache

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
PRESETS = ("quickstart", "125m", "350m", "760m", "1.3b", "2.7b", "6.7b")


def _count(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.2f}M" if n < 10e6 else f"{n / 1e6:.1f}M"


def preset_rows() -> list[str]:
    rows = []
    for preset in PRESETS:
        c = ModelConfig.from_preset(preset)
        counts = [_count(count_parameters(c.replace(attention=a))["total"]) for a in ("baseline", "diffv2", "diffv1")]
        kv = KVCache.bytes_per_token(c, dtype=__import__("torch").bfloat16) // 1024
        rows.append(f"| {preset} | {c.n_layers} | {c.dim} | {c.n_heads} | {c.n_kv_heads} | {c.head_dim} | "
                    f"{' | '.join(counts)} | {kv} KiB |")
    return rows


def test_readme_preset_table_is_what_count_parameters_says():
    text = README.read_text()
    for row in preset_rows():
        assert row in text, f"README's preset table should hold:\n{row}"


# ---- the commands, as written -------------------------------------------------------------------

QUICK_FIT = ["--trainer.val_check_interval", "2", "--data.init_args.val_tokens", "2048",
             "--trainer.callbacks.max_new_tokens", "8"]
# README command (its first words) -> what the test appends to make it quick; it runs as written otherwise.
RUN = {
    "diffv2-lit fit --config recipes/quickstart.yaml": ["--trainer.max_steps", "4", *QUICK_FIT],
    "diffv2-lit fit --config recipes/quickstart.yaml --ckpt_path last": ["--trainer.max_steps", "6", *QUICK_FIT],
    "diffv2-lit fit --config recipes/quickstart-baseline.yaml": ["--trainer.max_steps", "4", *QUICK_FIT],
    "diffv2-lit validate --config recipes/quickstart.yaml --ckpt_path last": ["--data.init_args.val_tokens", "2048"],
    "diffv2-lit prepare --input my_texts/ --output data/mine": [],
    "diffv2-lit train-tokenizer --input my_texts/ --output tok.json": [],
    "diffv2-lit prepare --input my_texts/ --output data/mine-bpe": [],
    "diffv2-lit compare runs/quickstart": [],
    "diffv2-lit generate --ckpt runs/quickstart/version_0/checkpoints/last.ckpt": [],
    "diffv2-lit export --ckpt runs/quickstart/version_0/checkpoints/last.ckpt": [],
}
NOT_RUN_HERE = {
    "pip install": "the test runs inside the installed package",
    "python -m pytest": "this is the test suite itself",
    "diffv2-lit fit --config recipes/125m-diffv2.yaml": "8 GPUs (the GPU recipes are parsed by tests/training/test_recipes.py)",
    "diffv2-lit fit --config recipes/1.3b-diffv2.yaml": "16 GPUs on 2 nodes",
    "diffv2-lit consolidate": "needs the 125m run's sharded checkpoint (consolidate is tested in test_fsdp2.py)",
    "lm_eval": "lm-evaluation-harness is not a dependency",
}


def bash_commands(markdown: str) -> list[str]:
    """Every command of every ```bash block, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", markdown, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = line.split("  #")[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def _key(command: str, table: dict) -> str | None:
    matches = [k for k in table if command == k or command.startswith(k + " ")]
    return max(matches, key=len) if matches else None


def _run(command: str, extra: list[str], cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    assert words[0] == "diffv2-lit"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
           "DIFFV2_LIT_CACHE": str(cwd / ".cache")}
    result = subprocess.run([sys.executable, "-m", "diffv2_lit", *words[1:], *extra], cwd=cwd, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}{result.stderr[-2000:]}"
    return result


def _workdir(tmp_path: Path) -> Path:
    """A user's checkout: the recipes and config fragments, and a folder of their own text."""
    for folder in ("recipes", "configs"):
        shutil.copytree(ROOT / folder, tmp_path / folder)
    texts = tmp_path / "my_texts"
    texts.mkdir()
    corpus = (ROOT / "tests" / "test_readme.py").read_text()  # any English-ish text will do
    for i in range(3):
        (texts / f"part{i}.txt").write_text(corpus * 3)
    return tmp_path


def test_every_readme_command_is_run_or_named_as_gpu_only():
    for command in bash_commands(README.read_text()):
        assert _key(command, RUN) or _key(command, NOT_RUN_HERE), f"README command with no test: {command}"


@pytest.mark.slow
def test_readme_commands_run_in_order(tmp_path):
    cwd = _workdir(tmp_path)
    outputs = {}
    for command in bash_commands(README.read_text()):
        key = _key(command, RUN)
        if key is not None:
            outputs[key] = _run(command, RUN[key], cwd)
    assert "resuming from runs/quickstart/version_0/checkpoints/" in \
        outputs["diffv2-lit fit --config recipes/quickstart.yaml --ckpt_path last"].stdout
    assert "resuming from runs/quickstart/version_1/checkpoints/" in \
        outputs["diffv2-lit validate --config recipes/quickstart.yaml --ckpt_path last"].stdout
    assert outputs["diffv2-lit generate --ckpt runs/quickstart/version_0/checkpoints/last.ckpt"].stdout.startswith("ROMEO:")
    first = load_file(cwd / "runs" / "quickstart" / "version_0" / "checkpoints" / "last.ckpt")["hyper_parameters"]
    assert first["tokenizer"] == "byte" and first["model_config"]["attention"] == "diffv2"  # the built-in corpus
    assert (cwd / "export" / "config.json").is_file() and (cwd / "data" / "mine-bpe" / "diffv2_data.json").is_file()
    report = "\n".join(p.read_text() for p in (cwd / "report").glob("*.md"))
    assert "diffv2" in report and "baseline" in report


def walkthrough_commands() -> list[str]:
    text = (ROOT / "docs" / "training.md").read_text()
    section = text[text.index("## From your own text to a 125m run"):]
    return bash_commands(section[:section.index("\n## ", 3)])


@pytest.mark.slow
def test_the_walk_from_own_text_to_a_125m_run(tmp_path):
    """docs/training.md's three commands as written, the fit with a tiny model on the CPU."""
    cwd = _workdir(tmp_path)
    tiny = ["--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "2",
            "--trainer.accumulate_grad_batches", "1", "--trainer.limit_val_batches", "2",
            "--model.architecture.n_layers", "1", "--model.architecture.dim", "64", "--model.architecture.n_heads", "2",
            "--model.architecture.n_kv_heads", "1", "--model.architecture.head_dim", "32", "--model.architecture.vocab_size", "1024",
            "--model.compile", "false", "--model.warmup_steps", "1", "--data.init_args.seq_len", "64",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--data.init_args.val_tokens", "1024"]
    commands = walkthrough_commands()
    assert [c.split()[1] for c in commands] == ["train-tokenizer", "prepare", "fit"]
    _run(commands[0].replace("--vocab-size 32000", "--vocab-size 1000"), [], cwd)  # a vocabulary this text can fill
    _run(commands[1], [], cwd)
    fitted = _run(commands[2], tiny, cwd)
    assert "logs and resolved config: runs/125m/version_0" in fitted.stdout
    assert (cwd / "runs" / "125m" / "version_0" / "checkpoints").is_dir()
