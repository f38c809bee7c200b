"""The precision and optimizer paths that GPU users run, exercised on the CPU (issue 11).

On an H200, `bf16-mixed` + fused AdamW + `gradient_clip_val` raised at the first step, FSDP1's
precision plugin could not clip by norm, and `16-mixed` + a spike skip left GradScaler without an inf
check. Lightning's mixed-precision plugins, GradScaler and fused AdamW all run on the CPU, so each
of those paths is trained here for a few real steps.
"""

import math

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.plugins.precision import FSDPPrecision

from diffv2_lit.callbacks import GradientSpikeDetector

from tests.training.helpers import ScaleGradientsAt, StepGradientNorms, tiny_data, tiny_module, tiny_trainer

CLIP = 0.05  # well below the tiny model's gradient norm (~1.5), so every step is clipped


def precision_kwargs(precision: str) -> dict:
    if precision == "16-mixed":  # Lightning swaps 16-mixed for bf16 on CPU unless given a CPU GradScaler
        return {"plugins": [MixedPrecision("16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=2.0**8))]}
    if precision == "fsdp1-bf16":  # the precision plugin of FSDPStrategy (configs/hardware/8gpu-fsdp1.yaml)
        return {"plugins": [FSDPPrecision("bf16-mixed")]}
    return {"precision": precision}


def finite_pairs(norms: StepGradientNorms) -> list[tuple[float, float]]:
    """(before clipping, applied) for the steps taken with finite gradients (GradScaler skips overflows)."""
    return [(norms.before[step], applied) for step, applied in norms.applied.items()
            if math.isfinite(norms.before[step]) and math.isfinite(applied)]


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed", "fsdp1-bf16", "32-true"])
def test_fused_adamw_clips_by_norm_under_every_precision_plugin(precision):
    norms = StepGradientNorms()
    trainer = tiny_trainer(max_steps=6, callbacks=[norms], gradient_clip_val=CLIP, **precision_kwargs(precision))
    module = tiny_module(fused_adamw=True)
    trainer.fit(module, tiny_data())

    assert trainer.global_step == 6 and trainer.optimizers[0].defaults["fused"] is True
    pairs = finite_pairs(norms)
    assert len(pairs) >= 4
    for before, applied in pairs:  # the optimizer applies gradients whose norm is exactly the clip value
        assert before > CLIP and applied == pytest.approx(CLIP, rel=1e-3)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_clipping_by_value_clamps_every_gradient_element():
    seen = []

    class LargestGradient(StepGradientNorms):
        def _record(self, optimizer, args, kwargs):  # after optimizer.step: the gradients it applied
            seen.append(max(p.grad.abs().max().item() for g in optimizer.param_groups for p in g["params"]))

    trainer = tiny_trainer(max_steps=3, callbacks=[LargestGradient()], gradient_clip_val=1e-3,
                           gradient_clip_algorithm="value", precision="bf16-mixed")
    trainer.fit(tiny_module(fused_adamw=True), tiny_data())
    assert seen and max(seen) == pytest.approx(1e-3)


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("fused", [True, False])
def test_spike_skip_with_mixed_precision_leaves_the_weights_and_keeps_training(tmp_path, precision, fused):
    """A skipped step under fp16 must still give GradScaler its inf check; the weights must not move."""
    spike_step = 8
    snapshots = {}

    class Snapshot(ScaleGradientsAt):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in (spike_step, spike_step + 1):
                snapshots[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    detector = GradientSpikeDetector(action="skip", warmup=4, log_dir=str(tmp_path))
    trainer = tiny_trainer(max_steps=spike_step + 3, callbacks=[Snapshot(spike_step, 1000.0), detector],
                           **precision_kwargs(precision))
    trainer.fit(tiny_module(fused_adamw=fused), tiny_data())

    assert trainer.global_step == spike_step + 3
    assert detector.last_spike_step == spike_step and detector.count == 1
    before, after = snapshots[spike_step], snapshots[spike_step + 1]
    assert all(torch.equal(before[k], after[k]) for k in before)
