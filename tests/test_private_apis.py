"""Canaries for the private names of other libraries that diffv2-lit relies on (docs/architecture.md lists
them): each fails with the symbol and the installed version when an upgrade removes or changes it."""

import lightning
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop


def test_lightning_per_batch_sigterm_broadcast():
    """callbacks/preemption.py switches it off once PreemptionCheckpoint owns SIGTERM."""
    assert callable(getattr(_TrainingEpochLoop, "_broadcast_sigterm_tensor", None)), (
        f"lightning {lightning.__version__}: _TrainingEpochLoop._broadcast_sigterm_tensor is gone; check whether "
        "Lightning still broadcasts its SIGTERM flag before every batch and update callbacks/preemption.py")


def test_lightning_model_checkpoint_last_saved_step():
    """callbacks/resume.py sets it to the resumed step (Lightning does not checkpoint it)."""
    callback = ModelCheckpoint(every_n_train_steps=3)
    assert getattr(callback, "_last_global_step_saved", None) == 0 and "_last_global_step_saved" not in \
        callback.state_dict(), (
        f"lightning {lightning.__version__}: ModelCheckpoint._last_global_step_saved changed; check whether a resumed "
        "run still saves again at its first micro-batch and update callbacks/resume.py")


def test_lightning_model_parallel_save_distributed_checkpoint_flag():
    """checkpoint/atomic_io.py reads it to write sharded saves in the background as Lightning would."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    for flag in (True, False):
        strategy = ModelParallelStrategy(save_distributed_checkpoint=flag)
        assert getattr(strategy, "_save_distributed_checkpoint", None) is flag, (
            f"lightning {lightning.__version__}: ModelParallelStrategy._save_distributed_checkpoint changed; update "
            "MarkShardedSaves._writes_sharded in checkpoint/atomic_io.py")
