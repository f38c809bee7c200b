"""DiffMonitor: numbers against hand computation on tiny models with known weights, and event files."""

from __future__ import annotations


import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.callbacks.conftest import TinyLM, fast_trainer, tiny_config, token_loader
from diffv2_lit.callbacks import DiffMonitor
from diffv2_lit.callbacks.diff_monitor import context_rms
from diffv2_lit.model import Transformer
from diffv2_lit.checkpoint.safe_load import load_file

PER_LAYER = ("context_rms_mean", "context_rms_p05", "context_rms_norm_mean", "context_rms_norm_p05",
             "below_floor_frac", "sink_mass", "max_hidden", "max_logit")
DIFF_ONLY = ("sink_mass_a1", "sink_mass_a2", "lambda_mean")
V2_ONLY = ("lambda_std", "lambda_min", "lambda_max")


def build(**overrides) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(tiny_config(**overrides))
    model.init_weights()
    return model


def distinct_tokens(batch: int, length: int, vocab: int) -> torch.Tensor:
    """Rows of distinct tokens, so value vectors are uncorrelated across keys."""
    g = torch.Generator().manual_seed(1)
    return torch.stack([torch.randperm(vocab, generator=g)[:length] for _ in range(batch)])


def logits_by_hand(attn, x: torch.Tensor) -> torch.Tensor:
    """Every causal attention logit q_t . k_s / sqrt(d) of one DIFF V2 layer [B, Hq, T, T] (-inf above the
    diagonal), from its q_proj / k_proj weights and its input x [B, T, D], not through the model's attention or
    RoPE code: RoPE is written as complex rotation (channel c and c + d/2 as the real and imaginary parts of
    one number, turned by position x theta^(-2c/d)). One key head: every query head reads it."""
    config = attn.config
    assert config.n_kv_heads == 1 and not config.qk_norm  # what this computation covers
    d, half = config.head_dim, config.head_dim // 2
    x = x.double()
    q = (x @ attn.q_proj.weight.double().T).unflatten(-1, (-1, d))  # [B, T, Hq, d]
    k = (x @ attn.k_proj.weight.double().T).unflatten(-1, (1, d))  # [B, T, 1, d]
    positions = torch.arange(x.shape[1], dtype=torch.float64)
    angle = positions[:, None] * config.rope_theta ** (-2 * torch.arange(half, dtype=torch.float64) / d)
    turn = torch.polar(torch.ones_like(angle), angle)[None, :, None, :]  # [1, T, 1, d/2]
    zq = torch.complex(q[..., :half], q[..., half:]) * turn
    zk = torch.complex(k[..., :half], k[..., half:]) * turn
    logits = torch.einsum("bthc,bsc->bhts", zq, zk[:, :, 0].conj()).real / d ** 0.5
    causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
    return logits.masked_fill(~causal, float("-inf"))


@pytest.mark.parametrize("kwargs, message", [
    ({"every_n_steps": 0}, "every_n_steps=0"),
    ({"probe": "text"}, "probe='text' is unknown"),
    ({"probe_batch_size": 0}, "probe_batch_size=0"),
    ({"probe_seq_len": 0}, "probe_seq_len=0"),
    ({"floor_margin": 1.5}, "floor_margin=1.5"),
    ({"sink_warmup": -1}, "sink_warmup=-1"),
])
def test_arguments_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiffMonitor(**kwargs)


def test_identical_pairs_with_saturated_lambda_give_zero_context():
    """DIFF V2 pair (2i, 2i+1) with equal queries attends identically; sigmoid(λ) = 1 subtracts it exactly."""
    model = build(n_layers=1, vocab_size=64)
    attn = model.layers[0].self_attn
    with torch.no_grad():
        q = attn.q_proj.weight.view(2 * model.config.n_heads, model.config.head_dim, -1)
        q[1::2] = q[0::2]
        model.embed_tokens.weight[:, 0] = 5.0  # a positive feature in every token after RMSNorm ...
        attn.lambda_proj.weight.zero_()
        attn.lambda_proj.weight[:, 0] = 1000.0  # ... read by lambda_proj: λ in the thousands, sigmoid(λ) = 1
    scalars, _ = DiffMonitor().measure(model, torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(0)))
    assert scalars["diff/lambda_min"] == 1.0 and scalars["diff/lambda_std"] == 0.0
    assert scalars["diff/context_rms_mean"] < 1e-6 and scalars["diff/context_rms_norm_mean"] < 1e-5
    assert scalars["diff/below_floor_frac"] == 1.0  # a softmax head could never get here
    assert scalars["diff/sink_mass"] == pytest.approx(0.0, abs=1e-6)  # a1 - a2 = 0 everywhere


def test_uniform_softmax_sits_on_the_one_over_sqrt_n_floor():
    """q = 0: every query spreads 1/n over its n visible keys. With unit-RMS uncorrelated values the
    context's mean square is 1/n of the values', so normalised RMS^2 x n averages to 1."""
    model = build(n_layers=1, attention="baseline", vocab_size=1024, dim=64, head_dim=32, n_kv_heads=2)
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.zero_()
    tokens = distinct_tokens(batch=4, length=64, vocab=1024)
    with model.diagnostics() as records:
        model(tokens)
    _, normalised = context_rms(records[0]["context"], records[0]["values"])
    n = torch.arange(1, 65, dtype=torch.float32)[None, :, None]
    assert (normalised.square() * n).mean().item() == pytest.approx(1.0, rel=0.1)

    monitor = DiffMonitor(sink_warmup=8)
    scalars, histograms = monitor.measure(model, tokens)
    assert scalars["diff/max_logit"] == 0.0  # all logits are q.k = 0
    expected_sink = sum(1.0 / n for n in range(9, 65)) / 56  # positions 8..63 put 1/n on key 0
    assert scalars["diff/sink_mass"] == pytest.approx(expected_sink, rel=1e-5)
    assert scalars["diff/below_floor_frac"] < 0.01  # none below half the floor
    assert scalars["diff/context_rms_norm_mean"] == pytest.approx(normalised.mean().item(), rel=1e-6)
    assert histograms == {} and not any("lambda" in tag or "sink_mass_a" in tag for tag in scalars)


def test_lambda_hidden_and_logit_stats_match_direct_computation():
    model = build(n_layers=2)
    tokens = torch.randint(0, 32, (2, 24), generator=torch.Generator().manual_seed(3))
    inputs, outputs = {}, {}
    hooks = [block.self_attn.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
             for i, block in enumerate(model.layers)]
    hooks += [block.register_forward_hook(lambda m, a, o, i=i: outputs.__setitem__(i, o))
              for i, block in enumerate(model.layers)]
    with torch.no_grad():
        model(tokens)
        for hook in hooks:
            hook.remove()
        logit_max = [logits_by_hand(block.self_attn, inputs[i]).max().item() for i, block in enumerate(model.layers)]

    scalars, histograms = DiffMonitor().measure(model, tokens)
    for i, block in enumerate(model.layers):
        gate = torch.sigmoid(block.self_attn.lambda_proj(inputs[i])).detach()
        tag = f"layer_{i:02d}"
        assert scalars[f"diff/lambda_mean/{tag}"] == pytest.approx(gate.mean().item(), rel=1e-5)
        assert scalars[f"diff/lambda_std/{tag}"] == pytest.approx(gate.std(unbiased=False).item(), rel=1e-4)
        assert scalars[f"diff/lambda_min/{tag}"] == pytest.approx(gate.min().item(), rel=1e-6)
        assert scalars[f"diff/lambda_max/{tag}"] == pytest.approx(gate.max().item(), rel=1e-6)
        assert torch.allclose(histograms[f"diff/lambda_hist/{tag}"].sort().values, gate.flatten().sort().values)
        assert scalars[f"diff/max_hidden/{tag}"] == pytest.approx(outputs[i].abs().max().item(), rel=1e-5)
        assert scalars[f"diff/max_logit/{tag}"] == pytest.approx(logit_max[i], rel=1e-6)
    for name in ("lambda_mean", "max_hidden", "sink_mass_a2"):
        per_layer = [scalars[f"diff/{name}/layer_{i:02d}"] for i in range(2)]
        assert scalars[f"diff/{name}"] == pytest.approx(sum(per_layer) / 2)
    assert scalars["diff/max_hidden_peak"] == max(scalars[f"diff/max_hidden/layer_{i:02d}"] for i in range(2))
    assert all(block.self_attn.diagnostics is None and not block._forward_hooks for block in model.layers)


def test_diffv1_reports_its_scalar_lambda():
    model = build(n_layers=3, attention="diffv1", n_heads=4, n_kv_heads=2)
    scalars, histograms = DiffMonitor().measure(model, torch.randint(0, 32, (1, 20)))
    for i, block in enumerate(model.layers):
        assert scalars[f"diff/lambda_mean/layer_{i:02d}"] == pytest.approx(block.self_attn.lambda_full().item())
    assert histograms == {} and "diff/lambda_std" not in scalars and "diff/sink_mass_a1" in scalars


def read_events(log_dir) -> EventAccumulator:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


@pytest.mark.parametrize("attention, accumulate", [("diffv2", 2), ("baseline", 1), ("diffv1", 1)])
def test_training_run_writes_the_expected_tags(tmp_path, attention, accumulate):
    overrides = {"attention": attention, "n_kv_heads": 2} if attention == "diffv1" else {"attention": attention}
    module = TinyLM(config=tiny_config(**overrides), lr=1e-3)
    fresh = TinyLM(config=tiny_config(**overrides), lr=1e-3).model  # same seed: the weights at step 0
    monitor = DiffMonitor(every_n_steps=5, sink_warmup=4)
    logger = TensorBoardLogger(tmp_path, name="", version="")
    trainer = fast_trainer(tmp_path, [monitor], max_steps=11, logger=logger, accumulate_grad_batches=accumulate)
    trainer.fit(module, token_loader())

    first_inputs = next(iter(token_loader()))[0]
    assert torch.equal(monitor.probe_tokens, first_inputs[:2])
    acc = read_events(logger.log_dir)
    tags = set(acc.Tags()["scalars"])
    names = PER_LAYER + (DIFF_ONLY if attention != "baseline" else ()) + (V2_ONLY if attention == "diffv2" else ())
    for name in names:
        assert {f"diff/{name}", f"diff/{name}/layer_00", f"diff/{name}/layer_01"} <= tags, name
        assert [e.step for e in acc.Scalars(f"diff/{name}")] == [0, 5, 10]  # once per step, also when accumulating
    if attention == "baseline":
        assert not any(tag.startswith("diff/lambda") or tag.startswith("diff/sink_mass_a") for tag in tags)
    hist_tags = set(acc.Tags()["histograms"])
    assert hist_tags == ({"diff/lambda_hist/layer_00", "diff/lambda_hist/layer_01"} if attention == "diffv2" else set())

    expected, _ = DiffMonitor(sink_warmup=4).measure(fresh, first_inputs[:2])
    for tag in ("diff/context_rms_mean", "diff/sink_mass/layer_01", "diff/max_hidden_peak"):
        assert acc.Scalars(tag)[0].value == pytest.approx(expected[tag], rel=1e-5), tag
    assert all(not block._forward_hooks and block.self_attn.diagnostics is None for block in module.model.layers)


def test_probe_survives_a_checkpoint_and_random_probe_is_seeded(tmp_path):
    monitor = DiffMonitor(every_n_steps=2)
    trainer = fast_trainer(tmp_path, [monitor], max_steps=3)
    trainer.fit(TinyLM(lr=1e-3), token_loader())
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = load_file(tmp_path / "last.ckpt")["callbacks"]["DiffMonitor"]
    restored = DiffMonitor()
    restored.load_state_dict(state)
    assert torch.equal(restored.probe_tokens, monitor.probe_tokens) and state["last_step"] == 2

    model = build()
    a = DiffMonitor(probe="random", probe_seq_len=12, seed=7).make_probe(None, model)
    b = DiffMonitor(probe="random", probe_seq_len=12, seed=7).make_probe(None, model)
    assert torch.equal(a, b) and a.shape == (2, 12) and int(a.max()) < model.config.vocab_size


def test_fit_start_rejects_a_module_without_a_transformer(tmp_path):
    import lightning as L

    class NoModel(L.LightningModule):
        pass

    with pytest.raises(TypeError, match="pl_module.model"):
        DiffMonitor().on_fit_start(None, NoModel())


def test_measure_runs_blocks_compiled_in_place_eagerly():
    """Training compiles each block in place (`block.compile()`); a diagnostic forward must not compile its
    own graphs (Python dicts and [B, Hq, T, S] maps as outputs): 0 new dynamo graphs, the numbers of the
    uncompiled model. dynamo's "eager" backend keeps the compile that training does cheap here."""
    from torch._dynamo.utils import counters

    plain, compiled = build(n_layers=2), build(n_layers=2)
    tokens = distinct_tokens(2, 16, compiled.config.vocab_size)
    for block in compiled.layers:
        block.compile(backend="eager")
    compiled(tokens)  # the training-path graphs, compiled before the monitor runs
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    scalars, _ = DiffMonitor().measure(compiled, tokens)
    assert counters["stats"]["unique_graphs"] == graphs
    expected, _ = DiffMonitor().measure(plain, tokens)
    assert scalars.keys() == expected.keys()
    for tag, value in expected.items():
        assert scalars[tag] == pytest.approx(value, rel=1e-6, abs=1e-9), tag


def test_sink_mass_reads_each_documents_first_token_under_document_masking():
    """q = 0 under a document mask: a query n tokens into its document (1-based) puts 1/n on that document's
    first token and nothing on position 0 (another document). Two documents of 40 and 24 tokens per row."""
    model = build(n_layers=1, attention="baseline", vocab_size=1024, dim=64, head_dim=32, n_kv_heads=2)
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.zero_()
    tokens = distinct_tokens(batch=2, length=64, vocab=1024)
    document_ids = (torch.arange(64) >= 40).long().expand(2, -1)
    scalars, _ = DiffMonitor(sink_warmup=8).measure(model, tokens, document_ids=document_ids)
    within = [n for n in range(9, 41)] + [n for n in range(9, 25)]  # 1-based offsets >= 8 into each document
    assert scalars["diff/sink_mass"] == pytest.approx(sum(1.0 / n for n in within) / len(within), rel=1e-5)
    unmasked, _ = DiffMonitor(sink_warmup=8).measure(model, tokens)
    assert unmasked["diff/sink_mass"] == pytest.approx(sum(1.0 / n for n in range(9, 65)) / 56, rel=1e-5)
