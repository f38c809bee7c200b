"""Canaries for the private names of other libraries that diffv2-lit relies on (docs/architecture.md lists
them): each fails with the symbol and the installed version when an upgrade removes or changes it."""

import lightning
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop


def test_lightning_per_batch_sigterm_broadcast():
    """callbacks/preemption.py switches it off once PreemptionCheckpoint owns SIGTERM."""
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None)), (
        f"lightning {lightning.__version__}: _TrainingEpochLoop._broadcast_sigterm_tensor is gone; check whether "
        "Lightning still broadcasts its SIGTERM flag before every batch and update callbacks/preemption.py")
