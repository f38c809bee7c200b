"""Document masking: inside a packed sequence, document 2 gets the logits and gradients it gets run alone,
for every variant and kernel (the independent computation is the model run on document 2 by itself)."""

import pytest
import torch

from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.model.attention import eager_attention, flex_attention, sdpa_attention
from diffv2_lit.model.documents import document_ids, document_mask, document_starts, flex_block_mask

EOS = 1
VARIANTS = ["baseline", "diffv2", "diffv1"]
KERNELS = ["eager", "sdpa"]


def _model(attention, backend):
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16,
                         ffn_hidden_dim=128, max_seq_len=64, attention=attention,
                         attn_backend="eager" if backend == "eager" else "sdpa")
    model = Transformer(config)
    model.init_weights()
    return model.double()


def _documents():
    """Three documents, each ending with one EOS, as `prepare` writes them; document 1 starts mid-row."""
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(2, 64, (n,), generator=gen) for n in (5, 9, 6)]
    docs = [torch.cat([d, torch.tensor([EOS])]) for d in docs]
    return docs, torch.cat(docs)[None]


def test_document_ids_and_starts():
    tokens = torch.tensor([[5, 1, 7, 8, 1, 9], [1, 1, 3, 4, 5, 6]])
    assert document_ids(tokens, EOS).tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 2, 2, 2, 2]]
    assert document_starts(document_ids(tokens, EOS)).tolist() == [[0, 0, 2, 2, 2, 5], [0, 1, 2, 2, 2, 2]]


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("attention", VARIANTS)
def test_packed_document_equals_document_alone(attention, backend):
    model = _model(attention, backend)
    docs, packed = _documents()
    start, end = len(docs[0]), len(docs[0]) + len(docs[1])
    packed_logits = model(packed, document_ids=document_ids(packed, EOS))
    packed_logits[0, start:end].sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    alone_logits = model(docs[1][None])  # plain causal attention, positions from 0
    alone_logits.sum().backward()
    torch.testing.assert_close(packed_logits[0, start:end], alone_logits[0], rtol=1e-7, atol=1e-7)  # RoPE tables are fp32
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-6, atol=1e-6, msg=name)
    # and masking matters: without it, document 2 reads document 1
    assert not torch.allclose(model(packed)[0, start:end], alone_logits[0])


@pytest.mark.parametrize("attention", VARIANTS)
@torch.no_grad()  # FlexAttention has no backward on the CPU (its unfused loop); the GPU suite runs it on CUDA
def test_packed_document_equals_document_alone_through_flex(attention, monkeypatch):
    model = _model(attention, "sdpa")
    monkeypatch.setattr(Transformer, "_document_mask", lambda self, ids, cache: flex_block_mask(ids))
    docs, packed = _documents()
    start, end = len(docs[0]), len(docs[0]) + len(docs[1])
    packed_logits = model(packed, document_ids=document_ids(packed, EOS))
    torch.testing.assert_close(packed_logits[0, start:end], model(docs[1][None])[0], rtol=1e-7, atol=1e-7)


def test_masked_keys_get_no_weight():
    """The eager kernel's probabilities under the document mask, against a per-document loop."""
    docs, packed = _documents()
    ids = document_ids(packed, EOS)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, packed.shape[1], heads, 8, generator=gen, dtype=torch.float64) for heads in (4, 2, 2))
    _, probs, _ = eager_attention(q, k, v, document_mask(ids))
    for i in range(packed.shape[1]):
        for j in range(packed.shape[1]):
            if j > i or ids[0, i] != ids[0, j]:
                assert (probs[0, :, i, j] == 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))


@pytest.mark.parametrize("value_dim", [8, 16], ids=["d", "2d"])
def test_flex_and_sdpa_equal_eager_under_a_document_mask(value_dim):
    docs, packed = _documents()
    ids = document_ids(packed.expand(2, -1).clone(), EOS)
    ids[1] = torch.arange(ids.shape[1]) // 7  # another row, other boundaries
    gen = torch.Generator().manual_seed(3)
    n = ids.shape[1]
    q = torch.randn(2, n, 8, 8, generator=gen, dtype=torch.float64)
    k = torch.randn(2, n, 2, 8, generator=gen, dtype=torch.float64)
    v = torch.randn(2, n, 2, value_dim, generator=gen, dtype=torch.float64)
    reference = eager_attention(q, k, v, document_mask(ids))[0]
    torch.testing.assert_close(sdpa_attention(q, k, v, document_mask(ids)), reference)
    torch.testing.assert_close(flex_attention(q, k, v, flex_block_mask(ids)), reference)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled FlexAttention needs CUDA")
@pytest.mark.parametrize("attention", VARIANTS)
def test_cuda_flex_path_matches_the_dense_mask_with_gradients(attention):
    """On CUDA the model picks a BlockMask by itself (compiled flex_attention, its backward included)."""
    model = _model(attention, "sdpa").float().cuda()
    _, packed = _documents()
    packed = packed.cuda()
    ids = document_ids(packed, EOS)
    assert not isinstance(model._document_mask(ids, None), torch.Tensor)
    flex_logits = model(packed, document_ids=ids)
    flex_logits.square().mean().backward()
    flex_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    dense = _model(attention, "eager").float().cuda()  # the same weights; the dense mask, eager kernel
    dense_logits = dense(packed, document_ids=ids)
    dense_logits.square().mean().backward()
    torch.testing.assert_close(flex_logits, dense_logits, rtol=2e-4, atol=2e-4)
    for name, p in dense.named_parameters():
        torch.testing.assert_close(flex_grads[name], p.grad, rtol=2e-3, atol=2e-5, msg=name)
