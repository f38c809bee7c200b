"""Issue 23.4: float8 training (torchao) of the blocks' projections, wired from outside the model.

On the CPU torchao emulates the float8 matmuls, so the wiring is tested here: which layers are converted
(named by hand from the architecture), that state dicts and checkpoints are those of the unconverted model,
that a few steps stay close to fp32, and that FSDP2 on 2 processes all-gathers the weights in float8."""

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.training.helpers import LossRecorder, TINY_MODEL, tiny_data, tiny_module, tiny_trainer

RUN = Path(__file__).with_name("float8_run.py")


def built(attention: str, float8, architecture: dict | None = None):
    module = tiny_module(attention, architecture=architecture, float8=float8)
    module.configure_model()
    return module


def float8_layers(module) -> set[str]:
    return {name for name, layer in module.model.named_modules() if type(layer).__name__ == "Float8Linear"}


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_only_the_blocks_attention_and_swiglu_projections_are_converted(attention):
    expected = {f"layers.{i}.{part}" for i in range(TINY_MODEL["n_layers"])
                for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    heads = {"n_heads": 4, "n_kv_heads": 2, "head_dim": 16}  # DIFF V1 halves the heads: both even
    module = built(attention, True, heads)
    assert float8_layers(module) == expected
    linear = {name for name, layer in module.model.named_modules() if isinstance(layer, torch.nn.Linear)}
    assert {name for name in linear - expected if "lambda_proj" not in name} <= {"lm_head", "output"}, linear - expected


def test_layers_whose_width_is_not_a_multiple_of_16_stay_unconverted():
    # one KV head of 8: k_proj and v_proj are 64 -> 8, which torchao's float8 matmul cannot take
    module = built("diffv2", "rowwise", {"n_heads": 8, "n_kv_heads": 1, "head_dim": 8})
    assert not any(name.endswith(("k_proj", "v_proj")) for name in float8_layers(module))
    assert any(name.endswith("q_proj") for name in float8_layers(module))


def test_the_state_dict_is_the_unconverted_models():
    L.seed_everything(0)
    converted = built("diffv2", True).model.state_dict()
    L.seed_everything(0)
    plain = built("diffv2", False).model.state_dict()
    assert list(converted) == list(plain)
    for name in plain:
        assert (converted[name].shape, converted[name].dtype) == (plain[name].shape, plain[name].dtype), name
        torch.testing.assert_close(converted[name], plain[name], rtol=0, atol=0)  # one initialisation


STEPS, SEQ_LEN = 2, 16  # torchao's CPU float8 matmul is a slow reference kernel: keep the work small


def _fit(float8, tmp_path: Path, steps: int = STEPS):
    L.seed_everything(0)
    recorder = LossRecorder()
    module = tiny_module("diffv2", max_steps=steps, warmup_steps=1, float8=float8)
    trainer = tiny_trainer(steps, callbacks=[recorder], enable_checkpointing=False)
    trainer.fit(module, tiny_data(seq_len=SEQ_LEN))
    path = tmp_path / f"float8-{float8}.ckpt"
    trainer.save_checkpoint(path)
    return recorder.losses, module, path


@pytest.fixture(scope="module")
def fp32_losses(tmp_path_factory):
    return _fit(False, tmp_path_factory.mktemp("fp32"))[0]


def test_a_float8_run_stays_close_to_fp32_and_its_checkpoint_loads_into_a_plain_model(tmp_path, fp32_losses):
    fp32 = fp32_losses
    float8, module, path = _fit(True, tmp_path)
    assert float8 != fp32  # the float8 matmuls really ran
    assert float8 == pytest.approx(fp32, rel=2e-3)

    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    plain = tiny_module("diffv2", float8=False)
    plain.configure_model()
    plain.load_state_dict(checkpoint["state_dict"])  # strict: the same names and shapes
    for name, tensor in module.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], tensor, rtol=0, atol=0)


def test_fsdp2_on_two_processes_all_gathers_in_float8_and_keeps_the_losses(tmp_path, fp32_losses):
    fp32 = fp32_losses
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(RUN), "--devices", "2", "--float8", "tensorwise", "--out", str(out),
                             "--steps", str(STEPS), "--seq-len", str(SEQ_LEN)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    sharded = json.loads(out.read_text())
    assert sharded["float8_all_gather"] is True
    assert sharded["losses"] == pytest.approx(fp32, rel=2e-3)
