"""Token sampling: top-p keeps the nucleus an independent computation gives, with one softmax for the filter."""

import torch

from diffv2_lit.model.generation import _top_p_filter, sample_next_token


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """The smallest set of most likely tokens whose probability reaches top_p, by hand."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


class SoftmaxCalls(torch.overrides.TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.softmax, torch.Tensor.softmax, torch.nn.functional.softmax)
        return func(*args, **(kwargs or {}))


def test_top_p_keeps_the_nucleus_with_one_softmax_for_the_filter():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=generator) * 3
    for top_p in (0.3, 0.7, 0.95):
        calls = SoftmaxCalls()
        with calls:
            filtered = _top_p_filter(logits, top_p)
        assert calls.count == 1
        for row in range(4):
            kept = set(torch.isfinite(filtered[row]).nonzero().flatten().tolist())
            assert kept == nucleus(torch.softmax(logits[row].double(), -1).tolist(), top_p)
    calls = SoftmaxCalls()
    with calls:
        tokens = sample_next_token(logits, top_p=0.7, generator=generator)
    assert calls.count == 2  # the filter's and the sampling distribution's
    assert all(t in nucleus(torch.softmax(logits[r].double(), -1).tolist(), 0.7) for r, t in enumerate(tokens.tolist()))
