"""Whole-decoder behaviour: causality, KV-cache decoding, meta-device init, names, diagnostics, sampling."""

import math

import pytest
import torch

from diffv2_lit.model import KVCache, ModelConfig, StaticKVCache, Transformer, sample_next_token
from diffv2_lit.inference.decoding import Decoder

VARIANTS = ["baseline", "diffv2", "diffv1"]


def tiny(attention, **overrides):
    fields = dict(vocab_size=97, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, max_seq_len=64,
                  attention=attention, attn_backend="sdpa")
    fields.update(overrides)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**fields))
    model.init_weights()
    return model.double().eval()


@pytest.mark.parametrize("attention", VARIANTS)
def test_future_tokens_do_not_change_earlier_logits(attention):
    model = tiny(attention)
    ids = torch.randint(0, 97, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 97, (2, 8))
    before, after = model(ids), model(changed)
    assert torch.allclose(before[:, :12], after[:, :12], atol=1e-12)
    assert not torch.allclose(before[:, 12:], after[:, 12:])


@pytest.mark.parametrize("attention", VARIANTS)
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("cache_kind", ["growing", "static"])
def test_kv_cache_decoding_matches_full_forward(attention, backend, cache_kind):
    """Prefill, a chunk, then one token at a time: logits equal a full forward's. The static cache hands
    all its S slots to the kernel, the unfilled ones masked."""
    model = tiny(attention, attn_backend=backend)
    ids = torch.randint(0, 97, (3, 16))
    full = model(ids)
    if cache_kind == "growing":
        cache = model.new_cache(batch_size=3, max_len=16)
    else:
        cache = StaticKVCache(model.config, batch_size=3, max_len=32)
    pieces = [model(ids[:, :5], cache), model(ids[:, 5:9], cache)]  # prefill, then a chunk
    pieces += [model(ids[:, t:t + 1], cache) for t in range(9, 16)]  # then one token at a time
    if cache_kind == "static":
        assert int(cache.length) == 16 and cache.keys[0].shape == (3, 32, 2, 16)
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-10)


@pytest.mark.parametrize("attention", VARIANTS)
def test_generate_greedy_equals_argmax_of_full_forward(attention):
    model = tiny(attention)
    prompt = torch.randint(0, 97, (2, 6))
    out = model.generate(prompt, max_new_tokens=8, temperature=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
    logits = model(out[:, :-1])
    assert torch.equal(logits[:, 5:].argmax(-1), out[:, 6:])


def test_kv_cache_holds_only_kv_heads_for_every_variant():
    """DIFF V2 doubles query heads, not the cache: all three cache h_kv * d per token and layer."""
    sizes = set()
    for attention in VARIANTS:
        model = tiny(attention)
        cache = model.new_cache(batch_size=1, max_len=10, dtype=torch.float32)
        assert cache.keys[0].shape == (1, 10, 2, 16) and cache.values[0].shape == (1, 10, 2, 16)
        sizes.add(KVCache.bytes_per_token(model.config))
    assert sizes == {2 * 2 * 2 * 16 * 2}


def test_prompt_too_long_for_the_context_is_refused():
    model = tiny("diffv2")
    with pytest.raises(ValueError, match="exceeds the model's context of 64 tokens"):
        model.generate(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(ValueError, match="past max_seq_len=64"):
        model(torch.zeros(1, 65, dtype=torch.long))


@pytest.mark.parametrize("attention", VARIANTS)
def test_meta_device_build_then_init_equals_eager_build(attention):
    config = ModelConfig(vocab_size=97, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                         attention=attention, tie_embeddings=attention == "baseline")
    eager = Transformer(config)
    torch.manual_seed(1)
    eager.init_weights()
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    torch.manual_seed(1)
    model.init_weights()
    for (name, a), (_, b) in zip(eager.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 97, (1, 8))
    assert torch.equal(eager(ids), model(ids))


def test_init_weights_scales_residual_projections():
    config = ModelConfig(n_layers=8, dim=256, init_std=0.02, attention="diffv2")
    model = Transformer(config)
    model.init_weights()
    block = model.layers[3]
    out_std = 0.02 / math.sqrt(2 * 8)
    assert block.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.self_attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert block.mlp.down_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.all(block.input_layernorm.weight == 1)


def test_state_dict_uses_hf_llama_names():
    keys = set(tiny("baseline").state_dict())
    layer = {f"layers.0.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_proj",
                                              "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert layer <= keys
    assert {"embed_tokens.weight", "norm.weight", "lm_head.weight"} <= keys
    assert "layers.0.self_attn.lambda_proj.weight" in tiny("diffv2").state_dict()
    v1 = set(tiny("diffv1").state_dict())
    assert {f"layers.1.self_attn.lambda_{n}" for n in ("q1", "k1", "q2", "k2")} <= v1
    assert "layers.1.self_attn.subln.weight" in v1


def test_tied_embeddings_share_one_matrix():
    model = tiny("diffv2", tie_embeddings=True)
    assert model.lm_head is None and "lm_head.weight" not in model.state_dict()
    final = {}
    model.norm.register_forward_hook(lambda module, args, out: final.setdefault("h", out))
    logits = model(torch.tensor([[3, 5]]))
    assert torch.allclose(logits, final["h"] @ model.embed_tokens.weight.T)


@pytest.mark.parametrize("attention", VARIANTS)
def test_diagnostics_match_the_normal_forward_and_leave_no_trace(attention):
    model = tiny(attention)
    ids = torch.randint(0, 97, (2, 10))
    plain = model(ids)
    with model.diagnostics() as records:
        diagnosed = model(ids)
    assert torch.allclose(plain, diagnosed, atol=1e-10)
    assert all(block.self_attn.diagnostics is None for block in model.layers)
    n_out_heads = 2 if attention == "diffv1" else 4
    for record in records:
        assert record["context"].shape[:3] == (2, 10, n_out_heads)
        assert record["effective_probs"].shape == (2, n_out_heads, 10, 10)
        assert ("lambda_" in record) == (attention != "baseline")


def test_sampling_respects_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    top_k = {sample_next_token(logits, top_k=2, generator=gen).item() for _ in range(200)}
    assert top_k == {0, 1}
    top_p = {sample_next_token(logits, top_p=0.7, generator=gen).item() for _ in range(200)}
    assert top_p == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there
    assert sample_next_token(logits, temperature=0).item() == 0


@pytest.mark.parametrize("attention", VARIANTS)
def test_static_decoding_generates_what_the_growing_cache_does(attention):
    model = tiny(attention)
    prompt = torch.randint(0, 97, (2, 6))
    eager = model.generate(prompt, max_new_tokens=10, temperature=0, decode="eager")
    static = model.generate(prompt, max_new_tokens=10, temperature=0, decode=Decoder("static"))
    assert torch.equal(static, eager)


@pytest.mark.slow
def test_compiled_decode_step_equals_the_uncompiled_one():
    """The captured step (torch.compile here; CUDA graphs on GPUs) gives the uncompiled step's logits, token
    after token, and a second generate call, for another length in the same cache bucket, compiles no new graph."""
    from torch._dynamo.utils import counters

    from diffv2_lit.inference.decoding import DecodeStep, shared_decoder
    from diffv2_lit.model import StaticKVCache

    model = tiny("diffv2", n_layers=1).float()  # one block: inductor compiles half the graph
    prompt = torch.randint(0, 97, (2, 6))
    caches = {mode: StaticKVCache(model.config, batch_size=2, max_len=32) for mode in ("eager", "compile")}
    steps = {mode: DecodeStep(mode) for mode in caches}
    tokens = {mode: model(prompt, cache)[:, -1].argmax(-1, keepdim=True) for mode, cache in caches.items()}
    for _ in range(8):
        logits = {mode: steps[mode](model, tokens[mode], caches[mode]) for mode in caches}
        torch.testing.assert_close(logits["compile"], logits["eager"], rtol=1e-5, atol=1e-5)
        tokens = {mode: logits[mode].argmax(-1, keepdim=True) for mode in caches}
    assert int(caches["compile"].length) == 14

    eager = model.generate(prompt, max_new_tokens=9, temperature=0)
    before = counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(prompt, max_new_tokens=9, temperature=0, decode=shared_decoder(model, "compile")),
                       eager)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > before  # the first call compiled (the counter is live)
    with torch.compiler.set_stance("fail_on_recompile"):
        again = model.generate(prompt, max_new_tokens=5, temperature=0, decode=shared_decoder(model, "compile"))
    assert torch.equal(again, eager[:, :11]) and counters["stats"]["unique_graphs"] == graphs


def test_decoders_for_many_models_modes_and_batches_stay_within_the_recompile_limit():
    """3 variants x 2 compiled modes x 2 batch sizes in one process: 12 (model, mode, batch) cases, more than
    dynamo's recompile limit of 8 graphs per code object. Each Decoder compiles its own copy of the step, so
    none hits the limit (fullgraph=True would raise), and a second round compiles 0 new graphs. The backend
    is dynamo's "eager" (graphs traced, guarded and counted as with inductor, minus inductor's code
    generation, minutes on 2 cores); the inductor path is the slow test above."""
    from torch._dynamo.utils import counters

    models = {variant: tiny(variant, n_layers=1).float() for variant in VARIANTS}
    decoders = {(variant, mode): Decoder(mode, backend="eager") for variant in VARIANTS
                for mode in ("compile", "cuda-graphs")}
    prompts = {batch: torch.randint(0, 97, (batch, 5)) for batch in (1, 2)}

    def decode_all():
        return {(variant, mode, batch): models[variant].generate(prompt, 3, temperature=0, decode=decoder)
                for (variant, mode), decoder in decoders.items() for batch, prompt in prompts.items()}

    before = counters["stats"]["unique_graphs"]
    first = decode_all()
    compiled = counters["stats"]["unique_graphs"]
    assert compiled - before == len(first)  # one graph per (model, mode, batch): the counter sees each compile
    with torch.compiler.set_stance("fail_on_recompile"):
        second = decode_all()
    assert counters["stats"]["unique_graphs"] == compiled  # every graph reused
    for (variant, mode, batch), out in first.items():
        eager = models[variant].generate(prompts[batch], 3, temperature=0)
        assert torch.equal(out, eager) and torch.equal(second[variant, mode, batch], eager)


def test_a_decoder_reuses_its_static_cache_reset_between_calls():
    """The same (batch, bucket) gets the same buffers back, emptied: a second generate decodes as the first
    did (stale keys from the first call would change its logits), and a captured step sees the same addresses."""
    model = tiny("diffv2")
    decoder = Decoder("static")
    first_prompt, second_prompt = torch.randint(0, 97, (2, 9)), torch.randint(0, 97, (2, 4))
    first = model.generate(first_prompt, 6, temperature=0, decode=decoder)
    (cache,) = decoder.caches.values()
    addresses = [buffer.data_ptr() for buffer in cache.keys + cache.values]
    second = model.generate(second_prompt, 6, temperature=0, decode=decoder)
    assert list(decoder.caches.values()) == [cache]
    assert [buffer.data_ptr() for buffer in cache.keys + cache.values] == addresses
    assert torch.equal(first, model.generate(first_prompt, 6, temperature=0))  # the growing cache, fresh
    assert torch.equal(second, model.generate(second_prompt, 6, temperature=0))


def counting_find_spec(monkeypatch) -> list[str]:
    """Every importlib.util.find_spec call from now on, by module name (a measurement: the real one runs)."""
    import importlib.util

    names, real_find_spec = [], importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        names.append(name)
        return real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    return names


def test_availability_probes_are_asked_once_per_process(monkeypatch):
    """Whether flash-attn and liger-kernel are installed is asked once (attn_backend auto asks when the model
    is built), not in every attention call (eager, activation-checkpoint recomputes) or every loss: find_spec
    walks sys.path. On the CPU a training forward reaches neither probe (both need CUDA inputs first), so the
    probes themselves are counted too: three calls, at most one find_spec each (before: one per call)."""
    from diffv2_lit.model.attention import flash_installed
    from diffv2_lit.model.loss import liger_available, resolve_loss_impl

    probes = counting_find_spec(monkeypatch)
    model = tiny("diffv2", attn_backend="auto").float().train()
    ids = torch.randint(0, 97, (2, 12))
    model(ids, targets=ids, loss_impl=resolve_loss_impl("auto", ids.device)).backward()
    for _ in range(3):
        flash_installed(), liger_available()
    assert probes.count("flash_attn") <= 1 and probes.count("liger_kernel") <= 1, probes
