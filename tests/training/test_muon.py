"""`model.optimizer: muon`: Muon for the blocks' matrices, AdamW for the rest (training/muon.py, optim.py).

Every check is against something computed here: Newton-Schulz and momentum written out from Keller Jordan's
published algorithm, the parameter names from the architecture, a single process for the sharded run, an
uninterrupted run for the resumed one.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffv2_lit.checkpoint.errors import ResumeError
from diffv2_lit.checkpoint.layout import is_sharded
from diffv2_lit.model import Transformer, resolve_model_config
from diffv2_lit.training.muon import MuonAdamW
from diffv2_lit.training.optim import muon_parameter_names, parameter_groups
from tests.faults.helpers import fit, output
from tests.training import muon_run
from tests.training.helpers import LossRecorder, TINY_MODEL, tiny_data, tiny_module, tiny_trainer

SCRIPT = Path(__file__).with_name("muon_run.py")
ROOT = SCRIPT.parents[2]
MUON = {"optimizer": "muon", "muon_lr": 0.05, "muon_weight_decay": 0.1, "muon_momentum": 0.9}


# ---- an independent Muon, from the published algorithm ------------------------------------------------

def reference_newton_schulz(g: torch.Tensor) -> torch.Tensor:
    """Keller Jordan's zeropower_via_newtonschulz5 (github.com/KellerJordan/Muon), 5 steps, in fp64 (bf16's
    rounding, amplified ~470x along the small singular directions, would hide a real difference)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.double()
    if g.size(0) > g.size(1):
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(5):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    if g.size(0) > g.size(1):
        x = x.T
    return x.float()


class RecordSteps(L.Callback):
    """Each step's weights and (per-token, as the optimizer sees them) gradients before the update, and the
    weights after it."""

    def __init__(self) -> None:
        self.before, self.grads, self.after = [], [], []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        pl_module.step_result()  # the gradients become per-token here (the spike detector asks the same way)
        named = dict(pl_module.model.named_parameters())
        self.before.append({n: p.detach().clone() for n, p in named.items()})
        self.grads.append({n: p.grad.detach().clone() for n, p in named.items()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append({n: p.detach().clone() for n, p in pl_module.model.named_parameters()})


def test_two_steps_equal_reference_newton_schulz_with_nesterov_momentum():
    """Step 1 and step 2 (momentum carried over) of every Muon matrix: W <- W (1 - lr wd) - lr s NS5(u), with
    u the nesterov mix of the gradient and its momentum buffer and s = sqrt(max(1, fan_out/fan_in)); the
    AdamW parameters' first step is lr g / (|g| + eps) (after decay where they decay). On the CPU the module
    orthogonalises in float32 (bf16 matmuls are emulated there): a bf16 Newton-Schulz misses this tolerance."""
    L.seed_everything(0)
    recorder = RecordSteps()
    trainer = tiny_trainer(max_steps=2, callbacks=[recorder], gradient_clip_val=None)
    module = tiny_module(attention="diffv2", schedule="constant", warmup_steps=0, max_steps=2, **MUON)
    trainer.fit(module, tiny_data())
    lr, wd, mu = MUON["muon_lr"], MUON["muon_weight_decay"], MUON["muon_momentum"]
    muon_names = muon_parameter_names(module.model)
    buffers = {n: torch.zeros_like(recorder.grads[0][n]) for n in muon_names}
    for step in range(2):
        for name in muon_names:
            w, g = recorder.before[step][name], recorder.grads[step][name]
            buffers[name] = mu * buffers[name] + (1 - mu) * g
            update = (1 - mu) * g + mu * buffers[name]
            scale = math.sqrt(max(1.0, w.shape[0] / w.shape[1]))
            expected_step = reference_newton_schulz(update)
            taken = (w * (1 - lr * wd) - recorder.after[step][name]) / (lr * scale)
            torch.testing.assert_close(taken, expected_step, rtol=0, atol=2e-4)  # |entries| ~ 0.05
    adamw_lr, decay = 3e-3, 0.1  # tiny_module's lr; weight_decay's default
    for name, w in recorder.before[0].items():
        if name in muon_names:
            continue
        g = recorder.grads[0][name]
        decayed = w * (1 - adamw_lr * decay) if name == "lm_head.weight" else w
        torch.testing.assert_close(recorder.after[0][name], decayed - adamw_lr * g / (g.abs() + 1e-8))


def test_muon_group_steps_exactly_as_torch_optim_muon():
    """Beside the written-out reference: the same matrix, gradients and settings through torch.optim.Muon
    (torch >= 2.9) give the same weights, bit for bit, over three steps (a tall and a wide matrix)."""
    if not hasattr(torch.optim, "Muon"):
        pytest.fail("this torch has no torch.optim.Muon to compare with (torch >= 2.9)")
    torch.manual_seed(0)
    for shape in [(48, 16), (16, 40)]:
        ours, theirs = torch.nn.Parameter(torch.randn(shape)), torch.nn.Parameter(torch.randn(shape))
        theirs.data.copy_(ours.data)
        aux = torch.nn.Parameter(torch.randn(3))  # an AdamW parameter alongside
        mine = MuonAdamW([{"params": [aux], "weight_decay": 0.0},
                          {"params": [ours], "use_muon": True, "lr": 0.03, "weight_decay": 0.1}],
                         lr=1e-3, betas=(0.9, 0.95), eps=1e-8, momentum=0.9)
        reference = torch.optim.Muon([theirs], lr=0.03, weight_decay=0.1, momentum=0.9, nesterov=True)
        for _ in range(3):
            grad = torch.randn(shape)
            ours.grad, theirs.grad, aux.grad = grad.clone(), grad.clone(), torch.randn(3)
            mine.step()
            reference.step()
            assert torch.equal(ours, theirs), shape


def test_a_parameter_without_gradient_is_left_alone():
    """The spike detector's skip drops gradients (None): such a matrix is neither decayed nor moved, and its
    momentum buffer is not created or advanced."""
    stepped, skipped = torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8, 4))
    before = skipped.detach().clone()
    optimizer = MuonAdamW([{"params": [stepped, skipped], "use_muon": True, "lr": 0.02, "weight_decay": 0.1}],
                          lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    stepped.grad, skipped.grad = torch.randn(8, 4), None
    optimizer.step()
    assert torch.equal(skipped, before) and skipped not in optimizer.state
    assert "momentum_buffer" in optimizer.state[stepped]


# ---- which parameter goes where ---------------------------------------------------------------------

def _hand_muon_names(n_layers: int) -> set[str]:
    return {f"layers.{i}.{part}.weight" for i in range(n_layers)
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


@pytest.mark.parametrize("attention", ["baseline", "diffv2", "diffv1"])
def test_parameter_groups_put_each_parameter_in_exactly_one_group(attention):
    config = resolve_model_config({**TINY_MODEL, "attention": attention, "n_kv_heads": 2})  # diffv1: even
    model = Transformer(config)
    decay, no_decay, muon = parameter_groups(model, 0.1, {"lr": 0.02, "weight_decay": 0.0})
    everything = [n for group in (decay, no_decay, muon) for n in group["names"]]
    assert sorted(everything) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    assert muon["use_muon"] and set(muon["names"]) == _hand_muon_names(config.n_layers)
    assert decay["names"] == ["lm_head.weight"] and decay["weight_decay"] == 0.1  # AdamW's decayed group: group 0
    hand_aux = {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{norm}.weight" for i in range(config.n_layers)
        for norm in ("input_layernorm", "post_attention_layernorm")}
    if attention == "diffv2":
        hand_aux |= {f"layers.{i}.self_attn.lambda_proj.weight" for i in range(config.n_layers)}  # a gate: AdamW
    if attention == "diffv1":
        hand_aux |= {f"layers.{i}.self_attn.{name}" for i in range(config.n_layers)
                     for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2", "subln.weight")}
    assert set(no_decay["names"]) == hand_aux and no_decay["weight_decay"] == 0.0


# ---- resume and sharding ----------------------------------------------------------------------------

class RecordGroups(L.Callback):
    def __init__(self) -> None:
        self.groups = []  # per step: (lr, momentum) of every group, as the optimizer is about to use them

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.groups.append([(g["lr"], g.get("momentum")) for g in optimizer.param_groups])


def _fit_in_process(max_steps: int, ckpt_dir: Path, resume: bool = False, groups: RecordGroups | None = None,
                    **kwargs) -> tuple[list[float], dict]:
    L.seed_everything(0)
    recorder = LossRecorder()
    trainer = tiny_trainer(max_steps=max_steps, enable_checkpointing=True, callbacks=[
        recorder, ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=2, save_last=True), *filter(None, [groups])])
    module = tiny_module(max_steps=6, **{**MUON, **kwargs})
    trainer.fit(module, tiny_data(), ckpt_path="last" if resume else None)
    return recorder.losses, {n: p.detach().clone() for n, p in module.model.named_parameters()}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    """4 steps, a checkpoint, 2 more steps from it: the same losses and weights, bit for bit, as 6 steps in
    one go (the momentum buffers and the schedule travel in the checkpoint)."""
    losses, weights = _fit_in_process(6, tmp_path / "straight")
    first, _ = _fit_in_process(4, tmp_path / "interrupted")
    state = torch.load(tmp_path / "interrupted" / "last.ckpt", weights_only=True)["optimizer_states"][0]
    buffers = [s for s in state["state"].values() if "momentum_buffer" in s]
    assert len(buffers) == len(_hand_muon_names(TINY_MODEL["n_layers"]))
    assert state["param_groups"][2]["use_muon"] and state["param_groups"][2]["initial_lr"] == MUON["muon_lr"]
    resumed, resumed_weights = _fit_in_process(6, tmp_path / "interrupted", resume=True)
    assert first + resumed == losses
    assert all(torch.equal(resumed_weights[n], weights[n]) for n in weights)

    with pytest.raises(ResumeError, match="was trained with model.optimizer=muon and this run uses adamw"):
        _fit_in_process(6, tmp_path / "interrupted", resume=True, optimizer="adamw")


def test_resume_applies_this_runs_muon_settings(tmp_path):
    """A resume with another muon_lr and momentum continues with them (the checkpoint's are replaced), the
    schedule's multiplier applied: step 4 of cosine(warmup 2, 6 steps, min 0.1) is 0.1 + 0.9 * (1 + cos(pi/2)) / 2."""
    _fit_in_process(4, tmp_path)
    groups = RecordGroups()
    _fit_in_process(5, tmp_path, resume=True, groups=groups, muon_lr=0.08, muon_momentum=0.5)
    multiplier = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    (decayed, plain, muon), = groups.groups
    assert muon == pytest.approx((0.08 * multiplier, 0.5)) and decayed[0] == pytest.approx(3e-3 * multiplier)


def _run(tmp_path: Path, name: str, *args: str) -> dict:
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_process_and_resume(tmp_path):
    """2 processes, FSDP2 (each matrix a dim-0 shard, gathered for Newton-Schulz): the same losses and full
    weights as 1 process, over 2 steps, then 2 more after a resume from the sharded checkpoint.

    Newton-Schulz runs in float32 here: in bf16 its ~470x gain along small singular directions turns the
    reduce-scatter's last-bit differences in the gradients into weight differences of ~3e-3 (measured),
    which would hide a wrong shard. The bf16 path is checked against torch.optim.Muon above."""
    run = argparse.Namespace(strategy="auto", devices=1, ckpt_dir=None, ns_float32=True)
    module, single_losses = muon_run.fit(run, 4, resume=False)
    single = {n: p.detach() for n, p in module.model.named_parameters() if n in muon_run.WATCHED}
    sharded = _run(tmp_path, "sharded", "--devices", "2", "--strategy", "fsdp2", "--ckpt-dir", str(tmp_path / "ckpts"),
                   "--max-steps", "2", "--resume-to", "4", "--ns-float32")
    assert is_sharded(tmp_path / "ckpts" / "last.ckpt")  # the resume read a sharded checkpoint
    torch.testing.assert_close(sharded["losses"], single_losses, rtol=1e-5, atol=1e-6)
    for name, weight in single.items():
        torch.testing.assert_close(torch.tensor(sharded["weights"][name]), weight, rtol=1e-4, atol=1e-6)


# ---- the CLI ----------------------------------------------------------------------------------------

def test_cli_optimizer_muon_trains_with_a_muon_group(tmp_path):
    result = fit(tmp_path, "--model.optimizer", "muon", "--trainer.max_steps", "3")
    assert result.returncode == 0, output(result)[-3000:]
    (last,) = (tmp_path / "runs").rglob("last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer"] == "muon"
    groups = checkpoint["optimizer_states"][0]["param_groups"]
    assert [g["use_muon"] for g in groups] == [False, False, True]
    assert len(groups[2]["params"]) == 7 * 2  # tiny.yaml: 2 blocks of 7 matrices
    assert groups[2]["initial_lr"] == 0.02 and groups[0]["initial_lr"] == 3e-3  # muon_lr's default; tiny.yaml's lr
