"""Every YAML under recipes/ and configs/ parses with LightningCLI, and every GPU recipe's model has
the size its name claims (within 10%), the GPT-3 batch of its size, the micro-batches written out below, the
states' memory counted by hand, the activation and logits memory its comment quotes measured here (one of its
blocks at its real width under autograd's saved-tensor hooks; the logits by hand), and the peak its comment
quotes from `diffv2-lit plan`, whose estimator tests/training/test_memory_measured.py checks against a real
FSDP2 run."""

import contextlib
import dataclasses
import functools
import io
import re
from pathlib import Path

import pytest

import torch

from diffv2_lit.cli import plan
from diffv2_lit.cli.fit import parse_config
from diffv2_lit.cli.plan import plan_from_config
from diffv2_lit.model import Transformer
from diffv2_lit.model.rope import rope_cos_sin
from diffv2_lit.model.transformer import Block
from diffv2_lit.training.memory import RECIPE_BUDGET_GIB
from diffv2_lit.training.module import resolve_model_config
from tests.training.test_memory_activations import saved_bytes

ROOT = Path(__file__).parents[2]
RECIPES = sorted(ROOT.glob("recipes/*.yaml"))
FRAGMENTS = sorted(ROOT.glob("configs/**/*.yaml"))
TINY = Path(__file__).with_name("configs") / "tiny.yaml"
SIZE_CLAIMS = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9}
GPU_RECIPES = [p for p in RECIPES if p.stem.split("-")[0] in SIZE_CLAIMS]
GIB = 2**30
# GPT-3's batch in tokens for each size (Brown et al. 2020, table 2.1: 0.5M, 0.5M, 0.5M, 1M, 1M, 2M).
GPT3_BATCH_TOKENS = {"125m": 2**19, "350m": 2**19, "760m": 2**19, "1.3b": 2**20, "2.7b": 2**20, "6.7b": 2**21}
# Written out by hand, per size (all its recipes): micro-batch per GPU, accumulation, fsdp_sync_every_micro_batch,
# activation_checkpointing, on 8 GPUs at 2048 tokens. From 2.7b up no-sync accumulation's unsharded fp32
# gradients (4 bytes a parameter on every GPU: about 10 GiB at 2.7b, 25 GiB at 6.7b) no longer leave room.
MICRO_BATCHES = {"125m": (16, 2, False, False), "350m": (16, 2, False, False), "760m": (8, 4, False, False),
                 "1.3b": (8, 8, False, False), "2.7b": (32, 2, True, True), "6.7b": (16, 8, True, True)}


def _model_config(config):
    spec = config.model.architecture
    if hasattr(spec, "as_dict"):
        spec = spec.as_dict()
    elif dataclasses.is_dataclass(spec):
        spec = dataclasses.asdict(spec)
    return resolve_model_config(spec)


def test_there_are_recipes_and_fragments():
    names = {p.stem for p in RECIPES}
    assert {"quickstart", "quickstart-baseline", "125m-control", "1.3b-control"} <= names
    for size in SIZE_CLAIMS:
        assert {f"{size}-baseline", f"{size}-diffv2"} <= names
    assert len(FRAGMENTS) >= 9


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_parses(path):
    config = _parsed(path)
    assert config.model.lr > 0
    _model_config(config)  # the ModelConfig validates (heads, vocab, ...)


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_fragment_composes_with_a_recipe(path):
    """Each fragment parses alone (the data defaults to the built-in corpus) and on top of a complete
    config (repeated --config)."""
    parse_config([str(path)])
    composed = parse_config([str(TINY), str(path)])
    assert composed.model.lr == pytest.approx(3e-3)


@functools.lru_cache(maxsize=None)  # a size's baseline, DIFF V2 and control recipes share their twin's plans
def _twin_fits(twin: Path, micro_batch: int, accumulation: int, sync: bool) -> bool:
    """Whether `diffv2-lit plan` fits the twin with this micro-batch in the recipes' budget (exit 0, else 1)."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = plan.main(["--config", str(twin), "--gpu_memory_gib", str(RECIPE_BUDGET_GIB),
                          "--data.init_args.batch_size", str(micro_batch),
                          "--trainer.accumulate_grad_batches", str(accumulation),
                          "--model.parallel.fsdp_sync_every_micro_batch", str(sync).lower()])
    assert code in (0, 1), code
    return code == 0


@functools.lru_cache(maxsize=None)  # one parse per recipe for the three tests that read it (read only)
def _parsed(path: Path):
    return parse_config([str(path)])


def _n_parameters(model_config) -> int:
    with torch.device("meta"):  # counted here, without the package's own count
        return sum(p.numel() for p in Transformer(model_config).parameters())


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_recipe_size_states_and_the_plan_its_comment_quotes(path):
    config = _parsed(path)
    model_config = _model_config(config)
    n_params = _n_parameters(model_config)
    claim = SIZE_CLAIMS[path.stem.split("-")[0]]
    assert abs(n_params / claim - 1) <= 0.10, f"{path.stem}: {n_params / 1e6:.0f}M parameters"

    # The comment quotes the command it names (tests/training/test_plan.py checks `memory_gib` against it).
    text = path.read_text()
    assert f"by `diffv2-lit plan --config recipes/{path.name}` (peak per GPU: " in text
    planned = plan_from_config(config)  # what `diffv2-lit plan --config RECIPE` prints
    out = plan.report(planned)
    peak = re.search(r"^peak per GPU: ([\d.]+) GiB$", out, re.M).group(1)
    assert f"(peak per GPU: {peak} GiB;" in text

    # The states by hand: fp32 weights, fp32 gradients and AdamW's two fp32 moments, 16 bytes a parameter,
    # sharded over the GPUs (FSDP2 pads each parameter's rows to a multiple of the GPU count: under 0.5% here);
    # without syncing every micro-batch, each GPU also keeps every parameter's whole fp32 gradient, 4 bytes each
    # (tests/training/test_memory_measured.py measures both terms in a real FSDP2 run).
    n_gpus = config.trainer.devices * config.trainer.num_nodes
    memory = planned.memory
    assert memory.states == pytest.approx(16 * n_params / n_gpus, rel=5e-3)
    sync = config.model.parallel.fsdp_sync_every_micro_batch
    assert memory.accumulated == (0 if sync else 4 * n_params)
    assert ("reduce-scattered every micro-batch" in text) == sync
    data = config.data.init_args
    tokens = n_gpus * data.batch_size * data.seq_len * config.trainer.accumulate_grad_batches
    assert re.search(rf"^tokens per step +{tokens:,} = ", out, re.M), out
    assert f"Tokens per step: {tokens:,}" in text
    assert model_config.max_seq_len >= data.seq_len


def _measured_block_bytes_per_token(model_config, checkpointed: bool, n_tokens: int = 32) -> float:
    """Bytes autograd keeps for backward per token in one bf16 block of this shape (FSDP2's compute dtype;
    eager SDPA, as the plan assumes), with the block's input only when `checkpointed`. Weights, the shared
    rotary tables and the values do not matter: zero weights, one sequence of n_tokens (nothing is T x T)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model_config = dataclasses.replace(model_config, attn_backend="sdpa")
    with torch.device("meta"):
        block = Block(model_config, layer_idx=0)
    block = block.to_empty(device="cpu").to(torch.bfloat16)
    for parameter in block.parameters():
        parameter.data.zero_()
    if checkpointed:
        block = checkpoint_wrapper(block, preserve_rng_state=False)
    x = torch.randn(1, n_tokens, model_config.dim, dtype=torch.bfloat16, requires_grad=True)
    cos, sin = rope_cos_sin(torch.arange(n_tokens), model_config.head_dim, model_config.rope_theta, torch.bfloat16)
    return saved_bytes(block, x, cos, sin, leave_out=(cos, sin)) / n_tokens


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_recipe_comment_quotes_the_activations_and_logits_measured_here(path):
    """The comment's activation term against one of the recipe's own blocks measured (every block keeps the
    same; a checkpointed block keeps its input, plus one block recomputed whole in backward), scaled to the
    micro-batch (nothing is T x T), and its logits term by hand: the plain loss keeps B T V fp32 log-softmax
    values and its backward adds two more fp32 B T V tensors (tests/training/test_memory_activations.py)."""
    config = _parsed(path)
    model_config = _model_config(config)
    text = " ".join(line.lstrip("# ") for line in path.read_text().splitlines() if line.startswith("#"))
    quoted = re.search(r"activations ([\d.]+), logits ([\d.]+) \(loss_impl plain", text)
    assert quoted, "the comment names its activation and logits terms and the plain loss"
    data, n_layers = config.data.init_args, model_config.n_layers
    tokens = data.batch_size * data.seq_len
    every = int(config.model.parallel.activation_checkpointing or 0)
    full = _measured_block_bytes_per_token(model_config, checkpointed=False)
    if every:
        kept_inputs = -(-n_layers // every)  # blocks 0, k, 2k, ... keep only their input
        per_token = kept_inputs * _measured_block_bytes_per_token(model_config, checkpointed=True)
        per_token += (n_layers - kept_inputs) * full + full
    else:
        per_token = n_layers * full
    activations_gib, logits_gib = float(quoted.group(1)), float(quoted.group(2))
    assert activations_gib == pytest.approx(per_token * tokens / GIB, rel=0.02, abs=0.05)
    assert logits_gib == pytest.approx(12 * tokens * model_config.vocab_size / GIB, abs=0.05)


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_recipe_batch_is_gpt3s_with_the_micro_batches_written_out(path):
    config = _parsed(path)
    size = path.stem.split("-")[0]
    data, trainer = config.data.init_args, config.trainer
    assert (trainer.devices * trainer.num_nodes, data.seq_len) == (8, 2048)
    assert (data.batch_size, trainer.accumulate_grad_batches, config.model.parallel.fsdp_sync_every_micro_batch,
            config.model.parallel.activation_checkpointing) == MICRO_BATCHES[size]
    assert 8 * data.batch_size * trainer.accumulate_grad_batches * data.seq_len == GPT3_BATCH_TOKENS[size]


def test_twins_differ_by_one_key():
    for path in RECIPES:
        if path.stem.endswith("-diffv2") or path.stem == "quickstart":
            twin = path.with_name(path.name.replace("diffv2", "baseline") if "diffv2" in path.stem
                                  else "quickstart-baseline.yaml")
            ours = [line for line in path.read_text().splitlines() if not line.startswith("#")]
            theirs = [line for line in twin.read_text().splitlines() if not line.startswith("#")]
            changed = [(a, b) for a, b in zip(ours, theirs) if a != b]
            assert len(ours) == len(theirs) and len(changed) == 1, (path.stem, changed)
            assert "attention: diffv2" in changed[0][0] and "attention: baseline" in changed[0][1]


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_gpu_recipe_fills_its_gpus_and_compiles(path):
    """The micro-batch is the largest power of two that `diffv2-lit plan` fits in the recipes' 72 GiB budget
    (for the larger twin) in the leaner accumulation mode (reduce-scatter every micro-batch) and that divides the
    sequences each GPU sees per step; FSDP2 then accumulates without syncing (less traffic) wherever that still
    fits, and syncs every micro-batch where its unsharded gradients would not. torch.compile is on."""
    config = _parsed(path)
    data, trainer = config.data.init_args, config.trainer
    per_gpu = data.batch_size * trainer.accumulate_grad_batches
    assert per_gpu % data.batch_size == 0 and data.batch_size & (data.batch_size - 1) == 0  # a power of two
    # Sized for the DIFF V2 twin (the larger), which its baseline and control are compared with.
    twin = path.with_name(path.stem.split("-")[0] + "-diffv2.yaml")

    def fits(micro_batch: int, sync: bool) -> bool:
        return _twin_fits(twin, micro_batch, max(1, per_gpu // micro_batch), sync)

    assert config.model.parallel.fsdp_sync_every_micro_batch == (not fits(data.batch_size, sync=False))
    assert fits(data.batch_size, sync=True)  # syncing holds less: implied where no-sync fits
    assert 2 * data.batch_size > per_gpu or not fits(2 * data.batch_size, sync=True)
    assert config.model.parallel.compile is True
    # Validation every 1000 optimizer steps whatever the accumulation (callbacks/validation.py).
    assert trainer.val_check_interval == 1000
    assert any(c.class_path.endswith("ValidationInOptimizerSteps") for c in trainer.callbacks)
    assert plan_from_config(config).validation_every == 1000
