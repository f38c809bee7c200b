"""The loss is the mean over every counted token of the optimizer step (issue 19.5): micro-batches and ranks
weigh by the tokens they count, so the applied gradient is the merged batch's, computed here by hand."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffv2_lit.model import Transformer, resolve_model_config
from tests.training.helpers import TINY_MODEL
from tests.training.per_token_run import COUNTED, SEQ, rows
from tests import zygote

SCRIPT = Path(__file__).with_name("per_token_run.py")
ROOT = SCRIPT.parents[2]


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "grads.pt"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    result = zygote.run(["--out", str(out), *args], tmp_path, env, timeout=300,
                        script=SCRIPT)  # rank 0 forked after the imports (tests/zygote.py)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return torch.load(out)


def merged_batch(initial: dict) -> tuple[float, dict]:
    """Mean cross-entropy over every counted target of all rows at once, and its gradients."""
    model = Transformer(resolve_model_config({**TINY_MODEL, "attention": "diffv2", "max_seq_len": SEQ}))
    model.load_state_dict(initial)
    inputs, targets = rows()
    logits = model(inputs).float()
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    loss = loss / (targets != -100).sum()
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("args", [
    pytest.param(("--accumulate", "4"), id="one-process-4-micro-batches"),
    pytest.param(("--devices", "2", "--strategy", "ddp", "--accumulate", "2"), id="ddp-2-ranks", marks=pytest.mark.slow),
    pytest.param(("--devices", "2", "--strategy", "fsdp2", "--accumulate", "2"), id="fsdp2-2-ranks",
                 marks=pytest.mark.slow),
])
def test_applied_gradient_is_the_merged_batch_gradient(tmp_path, args):
    run = _run(tmp_path, *args)
    expected_loss, expected = merged_batch(run["initial"])
    assert run["tokens"] == sum(COUNTED)
    assert run["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert run["grads"].keys() == expected.keys()
    for name, grad in run["grads"].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)
