"""Shared helpers for the data tests: tiny corpora written on the fly, prepared with the real pipeline."""

import json
import os
import random
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffv2_lit.data.prepare import prepare
from tests import zygote


def make_docs(n: int, seed: int = 0, min_words: int = 5, max_words: int = 60) -> list[str]:
    """Distinct documents (each starts with its number) with a little non-ASCII text."""
    rng = random.Random(seed)
    words = ["thou", "art", "más", "fair", "naïve", "day", "night", "sonne", "über", "rose", "ß"]
    return [f"doc {i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
            for i in range(n)]


def write_jsonl(path, docs, key="text"):
    path.write_text("".join(json.dumps({key: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


ROOT = Path(__file__).parents[2]

# A real `diffv2-lit fit` in seconds: a 1-layer model on a prepared folder `data` (next to run.yaml), TensorBoard
# logs in runs/data/version_<n>, a checkpoint every 5 steps. Format with max_steps and val_tokens.
TINY_RUN = """\
seed_everything: 7
trainer:
  accelerator: cpu
  precision: 32-true
  max_steps: {max_steps}
  limit_val_batches: 0
  num_sanity_val_steps: 0
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: runs, name: data}}
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args: {{every_n_train_steps: 5, save_last: true}}
model:
  architecture: {{preset: quickstart, n_layers: 1, dim: 32, n_heads: 2, n_kv_heads: 1, head_dim: 16, ffn_hidden_dim: 64,
                 max_seq_len: 64}}
data:
  class_path: diffv2_lit.data.datamodule.TokenDataModule
  init_args: {{data_dir: data, seq_len: 32, batch_size: 2, num_workers: 0, val_tokens: {val_tokens}}}
"""


def write_run(tmp_path, max_steps: int = 2, val_tokens: int = 0) -> None:
    (tmp_path / "run.yaml").write_text(TINY_RUN.format(max_steps=max_steps, val_tokens=val_tokens))


def diffv2_lit(tmp_path, command: str, *overrides: str) -> subprocess.CompletedProcess:
    """`diffv2-lit COMMAND --config run.yaml OVERRIDES` as a real process in tmp_path (forked from the zygote,
    tests/zygote.py: the imports paid once)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITDATA_DISABLE_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1",
           "DIFFV2_LIT_CACHE": str(tmp_path / "cache")}
    return zygote.run([command, "--config", "run.yaml", *overrides], tmp_path, env, timeout=300)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Built-in corpora are prepared into the cache: keep tests away from the user's ~/.cache.
    monkeypatch.setenv("DIFFV2_LIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def corpus_dir(tmp_path):
    """A prepared folder of 300 short jsonl documents (~20k byte tokens) in small chunks."""
    src = write_jsonl(tmp_path / "docs.jsonl", make_docs(300))
    out = tmp_path / "prepared"
    prepare([str(src)], out, chunk_size=2048, val_fraction=0.1, num_workers=1, verbose=False)
    return out


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """moto's S3 server on 127.0.0.1, one per session (skips without it; fails under DIFFV2_LIT_REQUIRE_S3_TESTS=1)."""
    from tests.data.s3_server import start_server

    server = start_server(tmp_path_factory.mktemp("s3_server"))
    yield server
    server.stop()


@dataclass
class S3Place:
    url: str  # a fresh s3://bucket/prefix for this test
    server: object  # tests.data.s3_server.S3Server

    def env(self, **overrides) -> dict:
        """The environment for a `diffv2-lit` subprocess: passed explicitly, not inherited by accident."""
        return {**os.environ, **self.server.env(), "LITDATA_DISABLE_VERSION_CHECK": "1", **overrides}

    # The tests' own look at the bucket, with their own client (independent of the code under test).

    def keys(self, url: str | None = None) -> dict[str, int]:
        """{key under the prefix: size}."""
        bucket, prefix = _bucket_and_prefix(url or self.url)
        pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/")
        return {o["Key"][len(prefix) + 1:]: o["Size"] for page in pages for o in page.get("Contents", [])}

    def read_json(self, key: str) -> dict:
        bucket, prefix = _bucket_and_prefix(self.url)
        return json.loads(self.server.client().get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read())

    def put(self, key: str, body: bytes) -> None:
        bucket, prefix = _bucket_and_prefix(self.url)
        self.server.client().put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=body)

    def contents(self) -> dict[str, bytes]:
        """{key under the prefix: its bytes}: what a test compares byte for byte."""
        bucket, prefix = _bucket_and_prefix(self.url)
        client = self.server.client()
        return {key: client.get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read() for key in self.keys()}

    def delete(self, key: str) -> None:
        bucket, prefix = _bucket_and_prefix(self.url)
        self.server.client().delete_object(Bucket=bucket, Key=f"{prefix}/{key}")

    def copy_from(self, url: str) -> None:
        """Copy every object under another prefix to this one (server side)."""
        client, (bucket, prefix), (_, source) = self.server.client(), _bucket_and_prefix(self.url), _bucket_and_prefix(url)
        for key in self.keys(url):
            client.copy_object(Bucket=bucket, Key=f"{prefix}/{key}", CopySource={"Bucket": bucket, "Key": f"{source}/{key}"})


def _bucket_and_prefix(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix


@pytest.fixture
def s3(s3_server, monkeypatch, request):
    """The AWS variables of the test server for this test only, and a prefix no other test uses."""
    from tests.data.s3_server import BUCKET

    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    name = re.sub(r"[^A-Za-z0-9-]+", "-", request.node.name).strip("-")[:60]
    return S3Place(f"s3://{BUCKET}/{name}-{uuid.uuid4().hex[:6]}", s3_server)
