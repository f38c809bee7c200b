"""The README and docs/*.md cannot drift: the README's preset table comes from `count_parameters`, its commands
run in the order it gives them on the quickstart with few steps, then every `diffv2-lit` command of docs/*.md that
runs on a CPU runs as written in the same folder, and every path the documents name for those runs exists
(GPU-only and network commands are listed, each with the reason)."""

import os
import re
import shlex
import shutil
import subprocess
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
    """The command as a real `diffv2-lit` process in cwd, forked after the imports (tests/zygote.py: the same
    main, argv, folder, environment and output; the console script itself is checked in tests/cli/test_typos.py
    and tests/training/test_cli.py)."""
    from tests import zygote

    words = shlex.split(command)
    assert words[0] == "diffv2-lit"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
           "DIFFV2_LIT_CACHE": str(cwd / ".cache")}
    result = zygote.run([*words[1:], *extra], cwd, env, timeout=300)
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


@pytest.fixture(scope="module")
def readme_walk(tmp_path_factory) -> tuple[Path, dict]:
    """The README's commands run in order in a user's checkout, once: (that folder, each command's result).
    The docs' commands below run in the same folder, on the same quickstart runs."""
    cwd = _workdir(tmp_path_factory.mktemp("readme_walk"))
    outputs = {}
    for command in bash_commands(README.read_text()):
        key = _key(command, RUN)
        if key is not None:
            outputs[key] = _run(command, RUN[key], cwd)
    return cwd, outputs


@pytest.mark.slow
def test_readme_commands_run_in_order(readme_walk):
    cwd, outputs = readme_walk
    assert "resuming from runs/quickstart/version_0/checkpoints/" in \
        outputs["diffv2-lit fit --config recipes/quickstart.yaml --ckpt_path last"].stdout
    assert "validating runs/quickstart/version_1/checkpoints/" in \
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
            "--model.parallel.compile", "false", "--model.warmup_steps", "1", "--data.init_args.seq_len", "64",
            "--data.init_args.batch_size", "2", "--data.init_args.num_workers", "0",
            "--data.init_args.val_tokens", "1024"]
    commands = walkthrough_commands()
    assert [c.split()[1] for c in commands] == ["train-tokenizer", "prepare", "fit"]
    _run(commands[0].replace("--vocab-size 32000", "--vocab-size 1000"), [], cwd)  # a vocabulary this text can fill
    _run(commands[1], [], cwd)
    fitted = _run(commands[2], tiny, cwd)
    assert "logs and resolved config: runs/125m/version_0" in fitted.stdout
    assert (cwd / "runs" / "125m" / "version_0" / "checkpoints").is_dir()


# ---- docs/*.md: their commands, as written, after the README's --------------------------------------

DOCS = ROOT / "docs"
# The order a reader follows them (each may use what the earlier ones wrote); the other pages hold no command.
DOC_ORDER = ("training.md", "data.md", "inference.md", "monitoring.md")
# docs command (its first words) -> what the test appends; it runs as written otherwise, in the README walk's folder.
DOC_RUN = {
    "diffv2-lit fit --config recipes/quickstart.yaml --print_config": [],
    "diffv2-lit plan --config recipes/": [],  # the planner builds the model on the meta device: any recipe, CPU
    "diffv2-lit prepare --input data/raw/ --input extra.jsonl.gz --output data/mycorpus": [],
    "diffv2-lit train-tokenizer --input data/raw/ --output tokenizers/my-8k.json": [],
    "diffv2-lit prepare --input data/raw/ --output data/my-8k": [],
    "diffv2-lit generate --ckpt runs/quickstart/version_0/checkpoints/last.ckpt": [],
    "diffv2-lit generate --ckpt export/": [],
}
DOC_NOT_RUN = {
    "diffv2-lit fit --config recipes/125m-diffv2.yaml": "8 GPUs (or one, with configs/hardware/1gpu.yaml)",
    "diffv2-lit fit --config recipes/125m-diffv2.yaml --config configs/hardware/1gpu.yaml --data.init_args.tokenizer":
        "run on the CPU with a tiny model by test_the_walk_from_own_text_to_a_125m_run",
    "diffv2-lit train-tokenizer --input my_texts/": "run by test_the_walk_from_own_text_to_a_125m_run",
    "diffv2-lit prepare --input my_texts/ --output data/pretrain": "run by test_the_walk_from_own_text_to_a_125m_run",
    "diffv2-lit consolidate runs/125m/": "needs the 125m run's sharded checkpoint (consolidate runs on a real sharded "
                                         "folder in tests/faults/test_damaged_checkpoints.py and test_fsdp2.py)",
    "diffv2-lit prepare --input data/raw/ --output s3://": "needs an S3 endpoint and credentials (network)",
    "diffv2-lit generate --ckpt runs/125m/": "CUDA (--device cuda) and the 125m run's checkpoint",
    "diffv2-lit compare runs/125m-diffv2 runs/125m-baseline": "needs the two 125m GPU runs",
    "diffv2-lit fit --config recipes/quickstart.yaml --data.init_args.data_dir data/mine":
        "the CPU walk from one's own text: run as written by tests/cli/test_cpu_walk.py",
    "diffv2-lit validate --config recipes/quickstart.yaml --data.init_args.data_dir data/mine":
        "the CPU walk from one's own text: run as written by tests/cli/test_cpu_walk.py",
}
# Paths the documents name in code that the walk does not write, with the reason.
PATHS_NOT_WRITTEN = {
    "data/": "diffv2_lit/data/, the package folder (docs/architecture.md)",
    "data/sources.py": "diffv2_lit/data/sources.py (docs/architecture.md)",
    "data/code": "a weighted mix's example folders (docs/data.md)",
    "data/web": "a weighted mix's example folders (docs/data.md)",
    "data/raw/": "the user's own text: written by this test as the input",
    "data/pretrain": "the GPU recipes' data (GPT-2 tokenizer); test_the_walk_from_own_text_to_a_125m_run writes it",
    "data/mine": "README's prepare: checked by the README walk",
    "tokenizers/gpt2.json": "GPT-2's tokenizer.json, which the user downloads",
    "tokenizers/mine.json": "written by test_the_walk_from_own_text_to_a_125m_run",
    "runs/mine/version_<n>/": "the CPU walk's run folder: tests/cli/test_cpu_walk.py checks it",
}
GPU_RUNS = ("runs/125m", "runs/<size>/")  # the GPU recipes' run folders


def doc_commands(markdown: str) -> list[str]:
    """The `diffv2-lit` commands of the ```bash blocks, as the shell splits them (comments dropped, words
    joined by one space); other programs (python, sbatch, export VAR=...) are not this project's CLI."""
    commands = []
    for command in bash_commands(markdown):
        words = shlex.split(command, comments=True)
        if words and words[0] == "diffv2-lit":
            commands.append(shlex.join(words))
    return commands


def _doc_plan() -> list[tuple[str, str, list[str] | str]]:
    """(page, command, extra args to run it with | why it is not run here), in DOC_ORDER."""
    readme = {shlex.join(shlex.split(c, comments=True)) for c in bash_commands(README.read_text()) if _key(c, RUN)}
    plan = []
    for page in DOC_ORDER:
        for command in doc_commands((DOCS / page).read_text()):
            if command in readme:
                plan.append((page, command, "the README walk runs it"))
                continue
            keys = [k for k in (*DOC_RUN, *DOC_NOT_RUN) if command == k or command.startswith(k)]
            key = max(keys, key=len) if keys else None
            plan.append((page, command, None if key is None else DOC_RUN.get(key, DOC_NOT_RUN.get(key))))
    return plan


def test_every_docs_command_is_run_or_listed_with_a_reason():
    pages = {p.name for p in DOCS.glob("*.md") if doc_commands(p.read_text())}
    assert pages <= set(DOC_ORDER), f"docs pages with commands the test does not walk: {sorted(pages - set(DOC_ORDER))}"
    for page, command, how in _doc_plan():
        assert how is not None, f"docs/{page} command with no test (add it to DOC_RUN or DOC_NOT_RUN): {command}"


def _user_inputs(cwd: Path) -> None:
    """What docs/data.md and docs/inference.md take from the user: a text folder, a gzipped jsonl, prompts."""
    import gzip
    import json

    raw = cwd / "data" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for text in (cwd / "my_texts").iterdir():
        shutil.copy(text, raw / text.name)
    lines = [json.dumps({"text": paragraph}) for paragraph in README.read_text().split("\n\n")]
    with gzip.open(cwd / "extra.jsonl.gz", "wt") as f:
        f.write("\n".join(lines) + "\n")
    (cwd / "prompts.txt").write_text("ROMEO:\nJULIET:\n")


def documented_paths() -> dict[str, set[str]]:
    """Run-relative paths (runs/..., export/, report/, data/..., tokenizers/...) named in code in the README and
    docs/*.md, -> the pages naming them."""
    found: dict[str, set[str]] = {}
    for page in (README, *sorted(DOCS.glob("*.md"))):
        text = page.read_text()
        code = re.findall(r"```\w*\n(.*?)```", text, re.S)
        code += re.findall(r"`([^`\n]+)`", re.sub(r"```\w*\n.*?```", "", text, flags=re.S))
        for span in code:
            for path in re.findall(r"(?<![\w/.])((?:runs|export|report|data|tokenizers)/[\w./<>=*-]*)", span):
                found.setdefault(path, set()).add(page.name)
    return found


@pytest.mark.slow
def test_docs_commands_run_as_written_and_their_paths_exist(readme_walk):
    cwd, _ = readme_walk
    _user_inputs(cwd)
    outputs = {}
    for page, command, how in _doc_plan():
        if isinstance(how, list):
            outputs[command] = _run(command, how, cwd)
    printed = next(r.stdout for c, r in outputs.items() if c.endswith("--print_config"))
    assert "max_steps: 1200" in printed and "data_dir: builtin:shakespeare" in printed
    assert all("peak per GPU:" in r.stdout for c, r in outputs.items() if c.startswith("diffv2-lit plan"))
    for c, r in outputs.items():
        if c.startswith("diffv2-lit generate"):
            assert "ROMEO:" in r.stdout, (c, r.stdout[-500:])
    missing = []
    for path, pages in sorted(documented_paths().items()):
        if path in PATHS_NOT_WRITTEN or path.startswith(GPU_RUNS):
            continue
        pattern = re.sub(r"<\w+>", "*", path.rstrip("/"))
        if not list(cwd.glob(pattern)):
            missing.append(f"{path} ({', '.join(sorted(pages))})")
    assert not missing, f"paths the documents name that the walk did not write: {missing}"
