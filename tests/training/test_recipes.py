"""Every YAML under recipes/ and configs/ parses with LightningCLI, and every GPU recipe's model has
the size its name claims (within 10%) and the memory its comment states (`diffv2-lit plan`'s peak)."""

import dataclasses
import math
import re
from pathlib import Path

import pytest

from diffv2_lit.model import count_parameters
from diffv2_lit.cli.fit import parse_config
from diffv2_lit.cli.plan import DEFAULT_GPU_MEMORY_GIB, plan_from_config
from diffv2_lit.model.memory import GIB, RECIPE_BUDGET_GIB, estimate_memory, largest_micro_batch
from diffv2_lit.training.module import resolve_model_config

ROOT = Path(__file__).parents[2]
RECIPES = sorted(ROOT.glob("recipes/*.yaml"))
FRAGMENTS = sorted(ROOT.glob("configs/**/*.yaml"))
TINY = Path(__file__).with_name("configs") / "tiny.yaml"
SIZE_CLAIMS = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9}
GPU_RECIPES = [p for p in RECIPES if p.stem.split("-")[0] in SIZE_CLAIMS]


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
    config = parse_config([str(path)])
    assert config.model.lr > 0
    _model_config(config)  # the ModelConfig validates (heads, vocab, ...)


@pytest.mark.parametrize("path", FRAGMENTS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_fragment_composes_with_a_recipe(path):
    """Each fragment parses alone (the data defaults to the built-in corpus) and on top of a complete
    config (repeated --config)."""
    parse_config([str(path)])
    composed = parse_config([str(TINY), str(path)])
    assert composed.model.lr == pytest.approx(3e-3)


@pytest.mark.parametrize("path", GPU_RECIPES, ids=lambda p: p.stem)
def test_recipe_size_and_memory(path):
    config = parse_config([str(path)])
    model_config = _model_config(config)
    n_params = count_parameters(model_config)["total"]  # built on the meta device
    claim = SIZE_CLAIMS[path.stem.split("-")[0]]
    assert abs(n_params / claim - 1) <= 0.10, f"{path.stem}: {n_params / 1e6:.0f}M parameters"

    # The comment quotes `diffv2-lit plan`: the configuration that will run (accumulation mode, loss, checkpointing).
    text = path.read_text()
    plan = plan_from_config(config)
    peak = plan.memory.total / GIB
    stated = float(re.search(r"^# memory_gib: ([\d.]+)$", text, re.M).group(1))
    assert stated == math.ceil(round(peak, 1)) and peak <= DEFAULT_GPU_MEMORY_GIB
    assert f"(peak per GPU: {peak:.1f} GiB;" in text
    sync = config.model.fsdp_sync_every_micro_batch
    assert ("reduce-scattered every micro-batch" in text) == sync
    data = config.data.init_args
    n_gpus = config.trainer.devices * config.trainer.num_nodes
    tokens = n_gpus * data.batch_size * data.seq_len * config.trainer.accumulate_grad_batches
    assert plan.tokens_per_step == tokens
    assert f"Tokens per step: {tokens:,}" in text
    assert model_config.max_seq_len >= data.seq_len


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
    """The micro-batch is the largest power of two whose memory estimate (for the larger twin) stays within
    the 80 GB budget in the leaner accumulation mode (reduce-scatter every micro-batch) and divides the
    sequences each GPU sees per step; FSDP2 then accumulates without syncing (less traffic) wherever that
    still fits, and syncs every micro-batch where its unsharded gradients would not. torch.compile is on."""
    config = parse_config([str(path)])
    # Sized for the DIFF V2 twin (the larger), which its baseline and control are compared with.
    twin = path.stem.split("-")[0] + "-diffv2.yaml"
    sizing = plan_from_config(parse_config([str(path.with_name(twin))]))
    data, trainer = config.data.init_args, config.trainer
    per_gpu = data.batch_size * trainer.accumulate_grad_batches
    synced = dataclasses.replace(sizing.layout, sync_every_micro_batch=True)
    expected = largest_micro_batch(sizing.model_config, synced, per_gpu)
    assert data.batch_size == expected
    doubled = dataclasses.replace(synced, micro_batch=2 * expected, accumulation=max(1, per_gpu // (2 * expected)))
    assert estimate_memory(sizing.model_config, doubled).total / GIB > RECIPE_BUDGET_GIB or 2 * expected > per_gpu
    no_sync = dataclasses.replace(synced, micro_batch=expected, sync_every_micro_batch=False)
    needs_sync = estimate_memory(sizing.model_config, no_sync).total / GIB > RECIPE_BUDGET_GIB
    assert config.model.fsdp_sync_every_micro_batch == needs_sync
    assert config.model.compile is True
    # Validation every 1000 optimizer steps whatever the accumulation (callbacks/validation.py).
    assert trainer.val_check_interval == 1000
    assert any(c.class_path.endswith("ValidationInOptimizerSteps") for c in trainer.callbacks)
    assert sizing.validation_every == 1000
