"""Prepared data in object storage: prepare to, stream from and resume from a real S3-compatible server.

The server is moto's, a separate process on 127.0.0.1 with authentication on (tests/data/s3_server.py);
the tests look at the bucket with their own client. Without the server they skip (CI fails them instead).
"""

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import lightning as L
import pytest
import torch
from filelock import FileLock

from diffv2_lit.data.datamodule import TokenDataModule
from diffv2_lit.data.folder import DataError
from diffv2_lit.cli.prepare import main
from diffv2_lit.data.prepare import prepare
from tests.data.conftest import make_docs, write_jsonl
from tests.data.s3_server import BUCKET, free_port
from tests.data.test_ddp import SavingRecorder
from tests.data.test_resume import _assert_resumes_exactly

pytestmark = pytest.mark.s3

ROOT = Path(__file__).parents[2]
PREFLIGHT_BOUND_S = 15  # a refused connection answers at once; the pre-flight's own timeout is 5 s
PREPARE_KWARGS = dict(chunk_size=2048, val_fraction=0.1, num_workers=1, verbose=False)  # ~10 small chunks


@pytest.fixture(scope="module")
def shared(s3_server, tmp_path_factory):
    """One prefix prepared once (through storage_options, not the environment) for the tests that only read
    it: 300 short documents, ~20k byte tokens. Tests that change data copy it to their own prefix."""
    src = write_jsonl(tmp_path_factory.mktemp("shared") / "docs.jsonl", make_docs(300))
    url = f"s3://{BUCKET}/shared-{uuid.uuid4().hex[:6]}"
    prepare([str(src)], url, storage_options=s3_server.storage_options(), **PREPARE_KWARGS)
    return url


def _cli(place, *args, cwd, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "diffv2_lit", *args], cwd=cwd, env=env or place.env(),
                          capture_output=True, text=True, timeout=timeout)


def _setup(**kwargs):
    """As Lightning does it: prepare_data (local rank 0: cleans the cache), then setup."""
    dm = TokenDataModule(**{"seq_len": 32, "batch_size": 4, "num_workers": 0, "val_tokens": 0, **kwargs})
    dm.prepare_data()
    dm.setup("fit")
    return dm


# ---------------------------------------------------------------- prepare

def test_prepare_command_uploads_with_the_marker_last_and_refuses_to_clobber(s3, tmp_path, capsys):
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(30))
    args = ["--input", str(src), "--output", s3.url, "--num-workers", "1", "--chunk-size", "1000",
            "--val-fraction", "0.1", "--quiet"]
    result = _cli(s3, "prepare", *args, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl"]  # no local folder named "s3:"

    meta, objects = s3.read_json("diffv2_data.json"), s3.keys()
    assert meta["splits"]["train"]["documents"] == 27 and meta["splits"]["val"]["documents"] == 3
    for split in ("train", "val"):
        index = s3.read_json(f"{split}/index.json")
        assert {f"{split}/{c['filename']}": c["chunk_bytes"] for c in index["chunks"]} == {
            key: size for key, size in objects.items() if key.startswith(f"{split}/chunk-")}
        assert meta["splits"][split]["chunks"] == len(index["chunks"])
    bucket, prefix = s3.url.removeprefix("s3://").split("/", 1)
    listing = s3.server.client().list_objects_v2(Bucket=bucket, Prefix=prefix + "/")["Contents"]
    modified = {o["Key"].removeprefix(prefix + "/"): o["LastModified"] for o in listing}
    assert modified["diffv2_data.json"] == max(modified.values())  # the completion marker comes last

    # In this process from here on: the same entry point, and a subprocess costs seconds of imports.
    assert main(args) == 2
    assert (f"diffv2-lit prepare: error: output {s3.url} holds data prepared earlier; pass --overwrite to replace it"
            in capsys.readouterr().err)
    assert main([*args, "--overwrite", "--seed", "7", "--chunk-size", "3000"]) == 0
    meta = s3.read_json("diffv2_data.json")
    assert meta["split"]["seed"] == 7
    chunks = meta["splits"]["train"]["chunks"] + meta["splits"]["val"]["chunks"]
    assert len(s3.keys()) == chunks + 3  # nothing of the first run is left: new chunks, 2 indexes, the marker


def test_failed_prepare_leaves_no_data_in_the_bucket(s3, tmp_path, capsys):
    src = tmp_path / "a.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "also fine"}\nnot json\n')
    assert main(["--input", str(src), "--output", s3.url, "--num-workers", "1", "--quiet", "--val-tokens", "0"]) == 2
    assert f"tokenizing failed, nothing was written: {src}, line 3: not valid JSON" in capsys.readouterr().err
    assert s3.keys() == {}


@pytest.mark.parametrize("prepared_first", [False, True])
def test_overwrite_never_deletes_objects_prepare_did_not_write(s3, shared, tmp_path, capsys, prepared_first):
    """Issue 24.1 on a prefix: the user's own objects (alone, or beside prepared data) stay byte for byte."""
    if prepared_first:
        s3.copy_from(shared)
    s3.put("notes.txt", b"my notes")
    s3.put("raw/book.txt", "a book, über alles".encode())
    before = s3.contents()
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(10))
    assert main(["--input", str(src), "--output", s3.url, "--overwrite", "--quiet", "--num-workers", "1"]) == 2
    err = capsys.readouterr().err
    why = "" if prepared_first else " (it has no diffv2_data.json: `diffv2-lit prepare` did not write it)"
    assert err == (f"diffv2-lit prepare: error: --overwrite refused: it would delete {s3.url}/notes.txt, which "
                   f"`diffv2-lit prepare` did not write{why}; --overwrite replaces only an earlier prepare's output: "
                   "choose a new --output\n")
    assert s3.contents() == before


def test_overwrite_replaces_a_killed_prepare(s3, shared, tmp_path):
    """A prepare killed mid-upload leaves chunks and its marker, no metadata: --overwrite replaces exactly those."""
    s3.copy_from(shared)
    s3.delete("diffv2_data.json")
    s3.put(".diffv2_prepare.json", b'{"format": "diffv2-lit-data", "pid": 1}')
    s3.put("train/chunk-7-9.bin", b"half a chunk")
    src = write_jsonl(tmp_path / "a.jsonl", make_docs(10))
    meta = prepare([str(src)], s3.url, overwrite=True, chunk_size=100_000, val_fraction=0.1, num_workers=1, verbose=False)
    assert set(s3.keys()) == {"diffv2_data.json", "train/index.json", "train/chunk-0-0.bin", "val/index.json",
                              "val/chunk-0-0.bin"}
    assert meta["splits"]["train"]["documents"] == 9


# ---------------------------------------------------------------- streaming

def test_streams_the_same_batches_and_validation_as_the_local_folder(s3, shared, tmp_path):
    local = tmp_path / "local"
    prepare([str(write_jsonl(tmp_path / "docs.jsonl", make_docs(300)))], local, **PREPARE_KWARGS)
    cache = tmp_path / "my-cache"
    kwargs = dict(seq_len=32, batch_size=4, val_tokens=640, shuffle=True, seed=3)
    remote_dm, local_dm = _setup(data_dir=shared, cache_dir=str(cache), **kwargs), _setup(data_dir=str(local), **kwargs)
    assert remote_dm.folders[0].is_remote
    assert remote_dm.folders[0].train_index["chunks"] == local_dm.folders[0].train_index["chunks"]

    train = [list(dm.train_dataloader()) for dm in (remote_dm, local_dm)]
    assert len(train[0]) == len(train[1]) > 3
    for (x_remote, y_remote), (x_local, y_local) in zip(*train):
        assert torch.equal(x_remote, x_local) and torch.equal(y_remote, y_local)
    val = [torch.cat([x for x, _ in dm.val_dataloader()]) for dm in (remote_dm, local_dm)]
    assert val[0].shape == (20, 32) and torch.equal(val[0], val[1])  # the fixed budget: 640 tokens / 32
    assert list(cache.rglob("chunk-*.bin"))  # the chunks were cached where asked


def test_fit_command_trains_from_s3(s3, shared, tmp_path):
    """The issue's command: `fit --data.init_args.data_dir s3://...` trained from a local folder named s3:."""
    fragment = tmp_path / "data.yaml"
    fragment.write_text("data:\n  class_path: diffv2_lit.data.datamodule.TokenDataModule\n"
                        "  init_args: {seq_len: 32, batch_size: 4, num_workers: 0, val_tokens: 256}\n"
                        # the quickstart preset's shape (tiny.yaml's fields back to the preset's), byte vocabulary
                        "model:\n  architecture: {n_layers: null, dim: null, n_heads: null, n_kv_heads: null, head_dim: null,"
                        " ffn_hidden_dim: null, max_seq_len: null, vocab_size: 320}\n"
                        "trainer:\n  max_steps: 3\n  limit_val_batches: null\n  val_check_interval: 3\n")
    result = _cli(s3, "fit", "--config", str(ROOT / "tests/faults/tiny.yaml"), "--config", str(fragment),
                  "--data.init_args.data_dir", shared, "--data.init_args.cache_dir", str(tmp_path / "cache"),
                  cwd=tmp_path, env=s3.env(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert not (tmp_path / "s3:").exists()
    checkpoint = torch.load(next((tmp_path / "runs").rglob("last.ckpt")), map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 3
    assert checkpoint["state_dict"]["model.embed_tokens.weight"].shape == (320, 128)  # the quickstart width
    assert list((tmp_path / "cache").rglob("chunk-*.bin"))


@pytest.mark.slow
def test_ddp_ranks_stream_disjoint_shards_through_one_cache(s3, shared, tmp_path):
    # Two ranks on one node: the same index, their own chunks, one shared cache folder (its locks).
    dm = TokenDataModule(data_dir=shared, seq_len=32, batch_size=4, num_workers=0, val_tokens=0,
                         cache_dir=str(tmp_path / "cache"))
    # ddp_spawn, not ddp_fork: forking a process whose autograd engine has run (an earlier test in the same
    # pytest worker) is unsafe ("Unable to handle autograd's threading in combination with fork").
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(SavingRecorder(tmp_path), datamodule=dm)
    rows = [{tuple(row.tolist()) for batch in torch.load(tmp_path / f"rank{r}.pt") for row in batch} for r in (0, 1)]
    assert len(rows[0]) == len(rows[1]) == 12 and not rows[0] & rows[1]


# ---------------------------------------------------------------- resume

@pytest.mark.parametrize("num_workers, other_cache", [(0, True), (2, False)], ids=["0-workers-new-cache", "2-workers"])
def test_resume_from_s3_sees_the_next_batches(s3, shared, tmp_path, num_workers, other_cache):
    # LitData records the local cache path in the loader state and refuses another one on resume; the
    # data module points it at this run's cache (the URL is what identifies the data).
    kwargs = dict(data_dir=shared, seq_len=32, batch_size=4, num_workers=num_workers, val_tokens=0,
                  cache_dir=str(tmp_path / "cache-a"))
    changes = {"cache_dir": str(tmp_path / "cache-b")} if other_cache else None
    _assert_resumes_exactly(kwargs, tmp_path, resume_changes=changes)
    assert list((tmp_path / ("cache-b" if other_cache else "cache-a")).rglob("chunk-*.bin"))


def test_weighted_mix_of_two_s3_folders(s3, tmp_path):
    urls = []
    for letter, n_docs in (("a", 150), ("b", 50)):
        src = write_jsonl(tmp_path / f"{letter}.jsonl", [letter * 60 for _ in range(n_docs)])
        urls.append(f"{s3.url}/{letter}")
        prepare([str(src)], urls[-1], **PREPARE_KWARGS)
    mix = [{"path": urls[0], "weight": 3}, {"path": urls[1], "weight": 1}]
    dm = _setup(mix=mix, seq_len=16, batch_size=8, val_tokens=800)
    loader = iter(dm.train_dataloader())
    inputs = torch.cat([next(loader)[0] for _ in range(40)])
    assert abs(float((inputs == ord("a")).any(dim=1).float().mean()) - 0.75) < 0.08  # ~3.3 standard deviations
    # Validation takes each source's share of the fixed budget: 800 tokens -> 38 + 13 sequences.
    val = torch.cat([x for x, _ in dm.val_dataloader()])
    assert (val == ord("a")).any(dim=1).sum() == 38 and (val == ord("b")).any(dim=1).sum() == 13

    # Resumed with another cache folder too: each source's position must follow it.
    kwargs = dict(mix=mix, seq_len=16, batch_size=8, num_workers=0, val_tokens=0, cache_dir=str(tmp_path / "cache-a"))
    _assert_resumes_exactly(kwargs, tmp_path, resume_changes={"cache_dir": str(tmp_path / "cache-b")})


# ---------------------------------------------------------------- errors: one line that says what to fix

def test_missing_bucket(s3):
    with pytest.raises(DataError, match=rf"S3 bucket 'no-such-bucket' does not exist at {s3.server.endpoint}; "
                                        "create it, or fix the bucket name in s3://no-such-bucket/data"):
        _setup(data_dir="s3://no-such-bucket/data")


@pytest.mark.parametrize("variable, value, code", [
    ("AWS_SECRET_ACCESS_KEY", "wrong-secret", "SignatureDoesNotMatch"),
    ("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNUNKNOWN00", "InvalidAccessKeyId"),
])
def test_wrong_credentials(s3, shared, tmp_path, monkeypatch, variable, value, code):
    monkeypatch.setenv(variable, value)
    with pytest.raises(DataError, match=rf"the S3 credentials were refused by .* \({code}\) for {shared}; "
                                        "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        _setup(data_dir=shared)
    with pytest.raises(DataError, match=rf"credentials were refused .* \({code}\)"):
        prepare([str(write_jsonl(tmp_path / "a.jsonl", make_docs(5)))], s3.url, **PREPARE_KWARGS)


def test_unreachable_endpoint_fails_fast(s3, shared, tmp_path, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed)
    start = time.monotonic()
    with pytest.raises(DataError, match=rf"cannot reach the S3 endpoint {closed} for {shared} .*check AWS_ENDPOINT_URL"):
        _setup(data_dir=shared)
    assert time.monotonic() - start < PREFLIGHT_BOUND_S

    start = time.monotonic()
    result = _cli(s3, "prepare", "--input", str(write_jsonl(tmp_path / "a.jsonl", make_docs(5))), "--output", s3.url,
                  "--quiet", cwd=tmp_path, env=s3.env(AWS_ENDPOINT_URL=closed), timeout=120)
    assert result.returncode == 2 and result.stderr.startswith(f"diffv2-lit prepare: error: cannot reach the S3 endpoint {closed}")
    assert time.monotonic() - start < PREFLIGHT_BOUND_S + 20  # + the command's own start (imports)


def test_prefix_without_prepared_data(s3, shared):
    with pytest.raises(DataError, match=rf"{s3.url} holds no prepared data \(nothing\); create it with "
                                        rf"`diffv2-lit prepare --input YOUR_TEXT --output {s3.url}`"):
        _setup(data_dir=s3.url)
    # An interrupted prepare: chunks and indexes, but no marker (prepare writes it last).
    s3.copy_from(shared)
    s3.delete("diffv2_data.json")
    with pytest.raises(DataError, match=r"holds no prepared data \(\d+ object\(s\), no diffv2_data.json: not written "
                                        rf"by `diffv2-lit prepare`\); .* --output {s3.url}-prepared` and set"):
        _setup(data_dir=s3.url)
    # The same, with the in-progress marker a killed prepare leaves: --overwrite is the fix then.
    s3.put(".diffv2_prepare.json", b'{"format": "diffv2-lit-data"}')
    with pytest.raises(DataError, match=r"object\(s\) of a prepare that did not finish, no diffv2_data.json\); re-run "
                                        rf"`diffv2-lit prepare --input YOUR_TEXT --output {s3.url} --overwrite`"):
        _setup(data_dir=s3.url)


def test_missing_chunk_is_named(s3, shared):
    s3.copy_from(shared)
    s3.delete("train/chunk-0-1.bin")
    with pytest.raises(DataError, match=rf"chunk file {s3.url}/train/chunk-0-1.bin is missing \(listed in index.json\); re-run "
                                        rf"`diffv2-lit prepare --output {s3.url} --overwrite`"):
        _setup(data_dir=s3.url)


# ---------------------------------------------------------------- the local cache

def test_cache_is_cleaned_of_partial_downloads(s3, shared, tmp_path):
    cache = tmp_path / "cache"
    first = [x for x, _ in _setup(data_dir=shared, cache_dir=str(cache), shuffle=False).train_dataloader()]
    stale_locks = sorted(cache.rglob("*.lock"))
    assert stale_locks  # LitData's S3 downloader leaves one per downloaded file
    chunk = next(cache.rglob("chunk-0-0.bin"))
    # What a killed reader leaves: partial downloads named after a process that is gone.
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphans = [chunk.with_name(f"chunk-0-1.bin.tmp.{int(gone.stdout)}"),
               chunk.with_name(f"chunk-0-2.bin.tmp.{int(gone.stdout)}.a1B2c3D4")]  # boto3 adds a suffix
    in_progress = chunk.with_name(f"chunk-0-3.bin.tmp.{os.getpid()}")  # a live process's download
    for path in [*orphans, in_progress]:
        path.write_bytes(b"partial")
    held = chunk.with_name("chunk-0-4.bin.lock")
    with FileLock(str(held)):
        second_dm = _setup(data_dir=shared, cache_dir=str(cache), shuffle=False)
        assert not any(p.exists() for p in orphans + stale_locks)
        assert in_progress.exists() and held.exists()
    second = [x for x, _ in second_dm.train_dataloader()]
    assert len(first) == len(second) and all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------- the server requirement itself

@pytest.mark.parametrize("required", [False, True])
def test_missing_server_skips_here_and_fails_in_ci(monkeypatch, required):
    from tests.data import s3_server

    monkeypatch.setattr(s3_server.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv(s3_server.REQUIRE_ENV, "1" if required else "0")
    outcome = pytest.fail.Exception if required else pytest.skip.Exception
    with pytest.raises(outcome, match=r"moto's S3 server is not installed \(pip install -e '.\[dev\]'"):
        s3_server.start_server(Path("unused"))
