"""Every YAML under recipes/ and configs/ parses with LightningCLI, and every GPU recipe's model has
the size its name claims (within 10%) and fits the memory its comment states."""

import dataclasses
import re
from pathlib import Path

import pytest

from diffv2_lit.model import count_parameters
from diffv2_lit.cli.fit import parse_config
from diffv2_lit.model.memory import estimate_memory_gib
from diffv2_lit.training.module import resolve_model_config

ROOT = Path(__file__).parents[2]
RECIPES = sorted(ROOT.glob("recipes/*.yaml"))
FRAGMENTS = sorted(ROOT.glob("configs/**/*.yaml"))
TINY = Path(__file__).with_name("configs") / "tiny.yaml"
SIZE_CLAIMS = {"125m": 125e6, "350m": 350e6, "760m": 760e6, "1.3b": 1.3e9, "2.7b": 2.7e9, "6.7b": 6.7e9}
GPU_MEMORY_GIB = 80


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


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem.split("-")[0] in SIZE_CLAIMS], ids=lambda p: p.stem)
def test_recipe_size_and_memory(path):
    config = parse_config([str(path)])
    model_config = _model_config(config)
    n_params = count_parameters(model_config)["total"]  # built on the meta device
    claim = SIZE_CLAIMS[path.stem.split("-")[0]]
    assert abs(n_params / claim - 1) <= 0.10, f"{path.stem}: {n_params / 1e6:.0f}M parameters"

    stated = float(re.search(r"^# memory_gib: ([\d.]+)$", path.read_text(), re.M).group(1))
    data = config.data.init_args
    n_gpus = config.trainer.devices * config.trainer.num_nodes
    estimate = estimate_memory_gib(model_config, data.batch_size, data.seq_len, n_gpus,
                                   config.model.activation_checkpointing)
    assert estimate <= stated <= GPU_MEMORY_GIB
    tokens = n_gpus * data.batch_size * data.seq_len * config.trainer.accumulate_grad_batches
    assert f"Tokens per step: {tokens:,}" in path.read_text()
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


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem.split("-")[0] in SIZE_CLAIMS], ids=lambda p: p.stem)
def test_gpu_recipe_fills_its_gpus_and_compiles(path):
    """The micro-batch is the largest power of two whose memory estimate (for the larger twin) stays within
    the 80 GB budget and divides the sequences each GPU sees per step; torch.compile is on."""
    from diffv2_lit.model.memory import RECIPE_BUDGET_GIB, largest_micro_batch

    config = parse_config([str(path)])
    sizing = parse_config([str(path.with_name(path.name.replace("baseline", "diffv2")))])
    data, trainer = config.data.init_args, config.trainer
    n_gpus = trainer.devices * trainer.num_nodes
    per_gpu = data.batch_size * trainer.accumulate_grad_batches
    expected = largest_micro_batch(_model_config(sizing), data.seq_len, n_gpus, per_gpu,
                                   config.model.activation_checkpointing)
    assert data.batch_size == expected
    assert estimate_memory_gib(_model_config(sizing), 2 * expected, data.seq_len, n_gpus,
                               config.model.activation_checkpointing) > RECIPE_BUDGET_GIB or 2 * expected > per_gpu
    assert config.model.compile is True
    assert trainer.val_check_interval == 1000 * trainer.accumulate_grad_batches  # every 1000 optimizer steps
