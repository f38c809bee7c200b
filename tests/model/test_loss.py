"""The fused output layer + cross-entropy (model/loss.py) against the plain one: loss and gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from diffv2_lit.model import ModelConfig, Transformer
from diffv2_lit.model.loss import IGNORE_INDEX, linear_cross_entropy, resolve_loss_impl


def reference_sum(hidden, weight, targets):
    """Written out: logits, log-softmax, the target's entry, summed over counted tokens."""
    log_probs = torch.log_softmax((hidden @ weight.t()).double(), dim=-1)
    counted = targets != IGNORE_INDEX
    picked = log_probs[torch.arange(len(targets)), targets.clamp(min=0)]
    return -(picked * counted).sum()


def inputs(n=37, d=16, v=50, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, d, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[::5] = IGNORE_INDEX  # padding / document boundaries count for nothing
    return hidden, weight, targets


@pytest.mark.parametrize("impl, chunk", [("plain", None), ("chunked", 8), ("chunked", 37), ("chunked", 4096)])
def test_loss_and_gradients_match_the_written_out_reference(impl, chunk):
    hidden, weight, targets = inputs()
    expected = reference_sum(hidden, weight, targets)
    grad_h, grad_w = torch.autograd.grad(expected, (hidden, weight))
    kwargs = {"chunk_size": chunk} if chunk else {}
    loss = linear_cross_entropy(hidden, weight, targets, impl, **kwargs)
    got_h, got_w = torch.autograd.grad(loss * 0.5, (hidden, weight))  # a scaled upstream gradient, as a mean has
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_h, 0.5 * grad_h, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got_w, 0.5 * grad_w, rtol=1e-5, atol=1e-7)


def test_chunked_under_bf16_autocast_stays_close_to_plain():
    hidden, weight, targets = inputs(n=64, d=32, v=300, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = linear_cross_entropy(hidden, weight, targets, "plain")
        chunked = linear_cross_entropy(hidden, weight, targets, "chunked", chunk_size=16)
    assert chunked.dtype == torch.float32
    torch.testing.assert_close(chunked, plain, rtol=2e-3, atol=1e-2)
    (g_plain,) = torch.autograd.grad(plain, weight)
    (g_chunked,) = torch.autograd.grad(chunked, weight)
    assert g_chunked.dtype == weight.dtype  # the fp32 master weight gets an fp32 gradient
    torch.testing.assert_close(g_chunked, g_plain, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("tie", [False, True])
def test_model_loss_equals_cross_entropy_of_its_logits(tie):
    """The model's fused loss path against F.cross_entropy of its own logits, tied embeddings included
    (their matrix gets gradient from the input side and from the output side)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=97, n_layers=2, dim=32, n_heads=2, n_kv_heads=1, head_dim=16,
                                    max_seq_len=32, tie_embeddings=tie)).double()
    model.init_weights()
    ids, targets = torch.randint(0, 97, (3, 12)), torch.randint(0, 97, (3, 12))
    targets[:, :2] = IGNORE_INDEX
    expected = F.cross_entropy(model(ids).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    loss = model(ids, targets=targets, loss_impl="chunked")
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8)


def test_auto_is_plain_on_the_cpu_and_liger_is_refused_there():
    assert resolve_loss_impl("auto", torch.device("cpu")) == "plain"
    with pytest.raises(ValueError, match="needs CUDA and liger-kernel"):
        resolve_loss_impl("liger", torch.device("cpu"))
    with pytest.raises(ValueError, match="loss_impl='fused' is unknown"):
        resolve_loss_impl("fused", torch.device("cpu"))


# ---- no gradient work without a gradient to compute (issue 19.7) ---------------------------------------


class MatmulSpy(TorchDispatchMode):
    """Records, below autograd, the operand shapes of every matrix product and the shape of every tensor an
    op allocates (an output whose storage is none of its inputs': views and no-op casts are not counted)."""

    MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
               torch.ops.aten.matmul.default}

    def __init__(self):
        super().__init__()
        self.matmuls: list[tuple[tuple, tuple]] = []
        self.allocated: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in self.MATMULS:
            self.matmuls.append((tuple(args[-2].shape), tuple(args[-1].shape)))
        inputs = {_storage(t) for t in [*args, *(kwargs or {}).values()] if isinstance(t, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and _storage(t) not in inputs:
                self.allocated.append(tuple(t.shape))
        return out


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("no_grad", [torch.no_grad, torch.inference_mode])
def test_chunked_loss_without_grad_mode_does_one_matmul_per_chunk_and_no_gradient(no_grad):
    hidden, weight, targets = inputs(n=37, d=16, v=50)  # both require grad, as a Parameter does
    with_grad = linear_cross_entropy(hidden, weight, targets, "chunked", chunk_size=8)
    with no_grad(), MatmulSpy() as spy:
        loss = linear_cross_entropy(hidden, weight, targets, "chunked", chunk_size=8)
    # ceil(37 / 8) = 5 chunks, each hidden[chunk] [<=8, 16] @ weight.T [16, 50]; nothing contracts over the
    # vocabulary (the logits' gradient @ weight) and nothing has the weight's shape (its gradient).
    assert spy.matmuls == [((8, 16), (16, 50))] * 4 + [((5, 16), (16, 50))]
    assert (50, 16) not in spy.allocated and (37, 16) not in spy.allocated
    assert not loss.requires_grad
    assert torch.equal(loss, with_grad.detach())
    torch.testing.assert_close(loss.double(), reference_sum(hidden, weight, targets).detach(), rtol=1e-6, atol=1e-6)


def test_chunked_loss_with_grad_mode_still_computes_gradients_in_the_forward():
    """The spy sees the gradient path when there is one: 3 matmuls per chunk (logits, d hidden, d weight)."""
    hidden, weight, targets = inputs(n=37, d=16, v=50)
    with MatmulSpy() as spy:
        linear_cross_entropy(hidden, weight, targets, "chunked", chunk_size=8)
    assert len(spy.matmuls) == 3 * 5 and (50, 16) in spy.allocated and (37, 16) in spy.allocated


@pytest.mark.parametrize("impl", ["plain", "chunked"])
def test_z_loss_adds_coefficient_times_squared_logsumexp_by_hand(impl):
    """z-loss = sum over counted tokens of z * (log sum_v exp(logit_v))^2, written out with math.log/exp."""
    import math
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([1, 6, -100, 0, 3])
    z = 0.1
    want = 0.0
    for n in range(5):
        if targets[n] == -100:
            continue
        logits = [float(hidden[n] @ weight[v]) for v in range(7)]
        lse = math.log(sum(math.exp(l) for l in logits))
        want += lse - logits[targets[n]] + z * lse ** 2
    got = linear_cross_entropy(hidden, weight, targets, impl, chunk_size=2, z_loss=z)
    assert abs(got.item() - want) < 1e-10
    got.backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    logits = h2 @ w2.T
    keep = targets != -100
    ref = (torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum")
           + z * torch.logsumexp(logits[keep], -1).square().sum())
    ref.backward()
    assert torch.allclose(hidden.grad, h2.grad, atol=1e-10) and torch.allclose(weight.grad, w2.grad, atol=1e-10)
