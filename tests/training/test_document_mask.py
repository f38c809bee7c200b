"""data.document_mask end to end: the quickstart recipe through the CLI with `--data.document_mask true`, the
batches it yields, and resume exactness with masking on."""

import os

import numpy as np
import pytest
import torch
import yaml

from diffv2_lit.cli.fit import run_lightning_cli
from diffv2_lit.data.datamodule import IGNORE_INDEX, ShiftTokens
from diffv2_lit.model.documents import document_ids

RECIPE = os.path.join(os.path.dirname(__file__), "..", "..", "recipes", "quickstart.yaml")
EOS = 258  # the byte tokenizer's


def test_shift_tokens_adds_document_ids_and_drops_the_prediction_across_each_eos():
    block = np.array([10, 11, EOS, 12, 13, EOS, EOS, 14, 15])
    inputs, targets, ids = ShiftTokens(EOS, pack=True, document_mask=True)(block)
    assert ids.tolist() == [0, 0, 0, 1, 1, 1, 2, 3]
    assert torch.equal(ids, document_ids(inputs, EOS))
    assert targets.tolist() == [11, EOS, IGNORE_INDEX, 13, EOS, IGNORE_INDEX, IGNORE_INDEX, 15]
    assert len(ShiftTokens(EOS, pack=True)(block)) == 2  # off: the batch is (inputs, targets) as before


def _quickstart(root, steps):
    config = yaml.safe_load(open(RECIPE).read())
    config["trainer"].update(max_steps=steps, val_check_interval=2, log_every_n_steps=1, enable_progress_bar=False)
    config["model"]["architecture"].update(n_layers=2, dim=64, n_heads=2, n_kv_heads=1, head_dim=32, max_seq_len=64)
    config["model"]["warmup_steps"] = 1
    config["data"]["init_args"].update(seq_len=64, batch_size=4, val_tokens=256)
    for callback in config["trainer"]["callbacks"]:
        name, args = callback["class_path"].rsplit(".", 1)[-1], callback.setdefault("init_args", {})
        args.update({"ModelCheckpoint": {"every_n_train_steps": 2, "save_top_k": -1},
                     "DiffMonitor": {"every_n_steps": 1, "sink_warmup": 4},
                     "SampleText": {"every_n_steps": 100, "max_new_tokens": 2, "print_at_end": False}}.get(name, {}))
    (root / "quickstart.yaml").write_text(yaml.safe_dump(config))


def _fit(root, *args):
    cwd = os.getcwd()
    os.chdir(root)
    try:
        run_lightning_cli(["fit", "--config", "quickstart.yaml", "--data.document_mask", "true", *args])
    finally:
        os.chdir(cwd)


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_quickstart_with_document_mask_trains_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFV2_LIT_CACHE", str(tmp_path / "cache"))
    _quickstart(tmp_path, steps=4)
    _fit(tmp_path)
    checkpoints = tmp_path / "runs" / "quickstart" / "version_0" / "checkpoints"
    straight = _load(checkpoints / "epoch=0-step=4.ckpt")
    assert straight["datamodule_hyper_parameters"]["document_mask"] is True
    monitor = next(v for k, v in straight["callbacks"].items() if "DiffMonitor" in k)
    # the batches carried document ids, and they are the EOS count of the probe's own tokens
    assert torch.equal(monitor["probe_document_ids"], document_ids(monitor["probe_tokens"], EOS))

    _fit(tmp_path, "--ckpt_path", str(checkpoints / "epoch=0-step=2.ckpt"))
    resumed = _load(tmp_path / "runs" / "quickstart" / "version_1" / "checkpoints" / "epoch=0-step=4.ckpt")
    for name, tensor in straight["state_dict"].items():
        assert torch.equal(tensor, resumed["state_dict"][name]), name


def test_the_training_loss_of_a_packed_row_is_the_sum_over_its_documents_run_alone():
    from tests.training.helpers import tiny_module

    module = tiny_module("diffv1", architecture={"n_heads": 4, "n_kv_heads": 2, "head_dim": 16})
    module.configure_model()
    eos = 1
    gen = torch.Generator().manual_seed(0)
    docs = [torch.cat([torch.randint(2, 64, (n,), generator=gen), torch.tensor([eos])]) for n in (6, 11, 9)]
    block = torch.cat(docs).numpy()
    inputs, targets, ids = ShiftTokens(eos, document_mask=True)(block)
    packed = module.summed_loss(inputs[None], targets[None], ids[None])
    # each document alone, predicting its own next tokens (its EOS's target belongs to the next document)
    alone = sum(module.model(d[None, :-1], targets=d[None, 1:]) for d in docs)
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
