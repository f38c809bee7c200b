"""Exact resume with a real Trainer, a real checkpoint and real chunks (Lightning #20550)."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.data.prepare import prepare
from tests.data.conftest import make_docs, write_jsonl


class BatchRecorder(L.LightningModule):
    """Records every training batch it sees; the loss is a dummy that keeps the optimizer busy."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        inputs, targets = batch
        self.seen.append(inputs.clone())
        return (self.weight * inputs.float().mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(dm_kwargs, max_steps, tmp_path, ckpt_path=None, every=None):
    callbacks = []
    if every:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=every, save_top_k=-1,
                                         filename="{step}"))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, callbacks=callbacks,
                        enable_checkpointing=bool(every), enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    module = BatchRecorder()
    trainer.fit(module, datamodule=TokenDataModule(**dm_kwargs), ckpt_path=ckpt_path)
    return module.seen


def _assert_resumes_exactly(dm_kwargs, tmp_path, total=12, at=5, resume_changes=None):
    """`resume_changes`: data settings the resumed run changes that must not change what it sees."""
    full = _fit(dm_kwargs, total, tmp_path, every=at)
    resumed = _fit({**dm_kwargs, **(resume_changes or {})}, total, tmp_path,
                   ckpt_path=tmp_path / "ckpt" / f"step={at}.ckpt")
    assert len(full) == total and len(resumed) == total - at
    for step, (a, b) in enumerate(zip(full[at:], resumed), start=at):
        assert torch.equal(a, b), f"resumed run diverges at step {step}"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_sees_the_next_batches(corpus_dir, tmp_path, num_workers):
    # ~20k tokens / (33 * 4) -> ~4 batches per epoch: the 12 steps cross epoch boundaries too.
    kwargs = dict(data_dir=str(corpus_dir), seq_len=32, batch_size=4, num_workers=num_workers, val_tokens=0)
    _assert_resumes_exactly(kwargs, tmp_path)


MIX_WORKERS_BUG = pytest.mark.xfail(
    strict=True, reason="LitData 0.2.76 restores each mixed source's position as if every worker had yielded "
    "whole batches of it, so a mix with DataLoader workers does not resume exactly (documented in docs/data.md)")


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=MIX_WORKERS_BUG)])
def test_resume_weighted_mix(tmp_path, num_workers):
    # Source b is small, so the mix's epoch (which ends before b runs out) is a few batches:
    # the 12 steps cross an epoch boundary.
    dirs = []
    for name, n_docs in (("a", 200), ("b", 4)):
        src = write_jsonl(tmp_path / f"{name}.jsonl", make_docs(n_docs, seed=len(name) + n_docs))
        prepare([str(src)], tmp_path / name, chunk_size=1024, val_fraction=0, num_workers=1, verbose=False)
        dirs.append(str(tmp_path / name))
    mix = [{"path": dirs[0], "weight": 0.7}, {"path": dirs[1], "weight": 0.3}]
    kwargs = dict(mix=mix, seq_len=32, batch_size=4, num_workers=num_workers, val_tokens=0)
    dm = TokenDataModule(**kwargs)
    dm.setup("fit")
    assert 8 < len(dm.train_dataloader()) < 20
    _assert_resumes_exactly(kwargs, tmp_path, total=20, at=8)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_new_micro_batch_continues_exactly_and_says_nothing(corpus_dir, tmp_path, num_workers):
    """Issue 19.15: a batch-size change (a new --global_batch_size split, fewer GPUs) warned that the stream
    "will not continue exactly"; it does: the resumed run sees the very sequences the first one would have."""
    kwargs = dict(data_dir=str(corpus_dir), seq_len=32, batch_size=4, num_workers=num_workers, val_tokens=0)
    full = [row for batch in _fit(kwargs, 12, tmp_path, every=4) for row in batch]  # 48 sequences
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _fit({**kwargs, "batch_size": 2}, 4 + 16, tmp_path, ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    rows = [row for batch in resumed for row in batch]
    assert len(rows) == 32 and all(torch.equal(a, b) for a, b in zip(full[16:], rows))
    assert not [w for w in caught if "continue exactly" in str(w.message)]


def test_a_mix_refuses_a_new_micro_batch_in_one_line(tmp_path):
    """LitData cannot restripe a weighted mix: its own ValueError came as a traceback after the warning."""
    from diffv2_lit.data.folder import DataError

    mix = []
    for name, n_docs in (("a", 200), ("b", 60)):
        src = write_jsonl(tmp_path / f"{name}.jsonl", make_docs(n_docs, seed=n_docs))
        prepare([str(src)], tmp_path / name, chunk_size=1024, val_fraction=0, num_workers=1, verbose=False)
        mix.append({"path": str(tmp_path / name), "weight": 0.5})
    kwargs = dict(mix=mix, seq_len=32, batch_size=4, num_workers=0, val_tokens=0)
    _fit(kwargs, 4, tmp_path, every=4)
    with pytest.raises(DataError) as refused:
        _fit({**kwargs, "batch_size": 2}, 8, tmp_path, ckpt_path=tmp_path / "ckpt" / "step=4.ckpt")
    assert str(refused.value) == ("data.batch_size is 2 but the checkpoint's was 4: LitData resumes a weighted mix "
                                  "(data.mix) only with the checkpoint's data.batch_size, data.num_workers and device "
                                  "count; set it back to 4 to resume")


@pytest.mark.parametrize("changed", [{"seq_len": 16}, {"seed": 43}, {"shuffle": False}])
def test_resume_with_another_sequence_order_is_one_line(corpus_dir, tmp_path, changed):
    """Another seq_len ended in an 85-line LitData traceback; another seed or shuffle silently meant other
    sequences at the checkpoint's position (issues 24.11, 19.12)."""
    from diffv2_lit.data.folder import DataError

    kwargs = dict(data_dir=str(corpus_dir), seq_len=32, batch_size=4, num_workers=0, val_tokens=0)
    _fit(kwargs, 3, tmp_path, every=3)
    key, value = next(iter(changed.items()))
    then = kwargs.get(key, {"seed": 42, "shuffle": True}.get(key))
    checkpoint = tmp_path / "ckpt" / "step=3.ckpt"
    with pytest.raises(DataError) as refused:
        _fit({**kwargs, **changed}, 6, tmp_path, ckpt_path=checkpoint)
    assert str(refused.value) == (
        f"data.{key} is {value!r} but {checkpoint} was trained with {then!r}: its data position means other sequences "
        f"now; set data.{key} back to {then!r} to resume, or start a new run from its weights with --model.init_from "
        f"{checkpoint}")
