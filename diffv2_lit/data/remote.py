"""Prepared data in S3-compatible object storage (`s3://bucket/prefix`), through LitData's own remote support.

Data moves only through LitData: `optimize(output_dir="s3://...")` uploads chunks, `StreamingDataset(
"s3://...", cache_dir=..., storage_options=...)` downloads them, and LitData's `S3FsProvider` reads,
writes and deletes the few small files around them (metadata, index.json). Endpoint and credentials come
from the standard AWS environment variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, profiles) or from `storage_options` (keyword arguments of
`boto3.client("s3", ...)`, e.g. `endpoint_url`), exactly as LitData resolves them.

boto3 is used directly only for pre-flight checks (one short request, and listing a prefix to check the
chunks an index names): LitData's clients retry 1000 times, so an unreachable endpoint hangs for hours,
and a missing bucket, a missing prefix and refused credentials all surface as a bare "403"/"404" from
HeadObject. The pre-flight turns each into one line that says what to fix, within a few seconds.
"""

from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from urllib.parse import urlparse

from diffv2_lit.data.errors import DataError, DataSettingError
from diffv2_lit.data.folder import DataFolder, open_prepared
from diffv2_lit.data.layout import METADATA_FILE, PROGRESS_FILE

S3_SCHEME = "s3://"
PREFLIGHT_TIMEOUT_S = 5
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_CREDENTIAL_ERRORS = ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                      "InvalidClientTokenId", "AuthorizationHeaderMalformed", "403")


def is_url(spec: str | Path) -> bool:
    """True for `scheme://...` (s3 or any other scheme), False for local paths and `builtin:` names."""
    return isinstance(spec, str) and bool(_URL.match(spec))


def is_s3(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(S3_SCHEME)


def check_url(spec: str) -> str:
    """An s3:// URL without its trailing slashes; any other scheme is refused (it would become a local path)."""
    if not is_s3(spec):
        scheme = spec.split("://", 1)[0]
        raise DataSettingError(f"{spec}: {scheme}:// is not supported; use a local folder or an s3://bucket/prefix URL "
                        "(S3-compatible servers: set AWS_ENDPOINT_URL)")
    parsed = urlparse(spec)
    if not parsed.netloc:
        raise DataSettingError(f"{spec} names no bucket; write s3://BUCKET/PREFIX")
    return spec.rstrip("/")


def split_url(url: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> ("bucket", "a/b")."""
    parsed = urlparse(url)
    return parsed.netloc, parsed.path.strip("/")


def join(url: str, *names: str) -> str:
    return "/".join([url.rstrip("/"), *names])


# ---------------------------------------------------------------- one prefix and its clients

class S3Prefix:
    """An s3://bucket/prefix with the two clients that reach it, each built once (building a boto3
    client parses botocore's endpoint data: a few tenths of a second).

    - a boto3 client with short timeouts and one retry, for the pre-flight (`list`);
    - LitData's `S3FsProvider`, for the small files around the chunks (metadata, index.json).
    """

    kind, where = "prefix", "in the bucket"  # for folder.open_prepared's messages

    def __init__(self, url: str, storage_options: dict | None = None):
        allow_plain_http_endpoints()  # every S3 path builds its S3Prefix before LitData builds a store
        self.url = check_url(url)
        self.bucket, self.key = split_url(self.url)
        self.storage_options = dict(storage_options or {})

    def child(self, *names: str) -> str:
        return join(self.url, *names)

    @functools.cached_property
    def _preflight_client(self):
        """A boto3 client built the way LitData's S3Client builds one, but with short timeouts."""
        import boto3
        from botocore.config import Config

        config = Config(connect_timeout=PREFLIGHT_TIMEOUT_S, read_timeout=PREFLIGHT_TIMEOUT_S,
                        retries={"mode": "standard", "total_max_attempts": 2})
        return boto3.Session().client("s3", **{**self.storage_options, "config": config})

    @functools.cached_property
    def _fs(self):
        from litdata.streaming.fs_provider import S3FsProvider

        return S3FsProvider(storage_options=dict(self.storage_options))

    def list(self) -> dict[str, int]:
        """{key relative to the prefix: size} of everything under it; raises DataError for the reasons a
        user can fix (endpoint, credentials, bucket), naming what to change."""
        from botocore import exceptions as boto

        prefix = f"{self.key}/" if self.key else ""
        try:
            pages = self._preflight_client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            return {obj["Key"][len(prefix):]: obj["Size"] for page in pages for obj in page.get("Contents", [])}
        except (boto.NoCredentialsError, boto.PartialCredentialsError):
            raise DataSettingError(f"no S3 credentials for {self.url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                            "(or AWS_PROFILE) in the environment") from None
        except boto.ClientError as err:
            raise DataSettingError(self._client_error_message(err)) from None
        except (boto.ConnectionError, boto.HTTPClientError) as err:  # refused, DNS, timeouts, dropped
            raise DataSettingError(f"cannot reach the S3 endpoint {self.endpoint} for {self.url} ({type(err).__name__}, "
                            f"{PREFLIGHT_TIMEOUT_S} s timeout); check AWS_ENDPOINT_URL (or storage_options "
                            "endpoint_url) and that the server is up") from None
        except (boto.BotoCoreError, ValueError) as err:  # e.g. an invalid bucket name or endpoint URL
            raise DataError(f"S3 request for {self.url} failed: {str(err).strip().splitlines()[-1]}") from None

    @property
    def endpoint(self) -> str:
        return self._preflight_client.meta.endpoint_url

    def _client_error_message(self, err) -> str:
        code = str(err.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "404"):
            return (f"S3 bucket {self.bucket!r} does not exist at {self.endpoint}; create it, or fix the bucket "
                    f"name in {self.url} (or AWS_ENDPOINT_URL if the bucket lives elsewhere)")
        if code in _CREDENTIAL_ERRORS:
            return (f"the S3 credentials were refused by {self.endpoint} ({code}) for {self.url}; check "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        if code == "AccessDenied":
            return (f"access denied to {self.url} at {self.endpoint}; the credentials need s3:ListBucket and "
                    "s3:GetObject (and s3:PutObject, s3:DeleteObject to prepare data there)")
        message = err.response.get("Error", {}).get("Message", "")
        return f"S3 request for {self.url} at {self.endpoint} failed: {code} {message}".rstrip()

    def read_json(self, name: str) -> dict:
        with tempfile.TemporaryDirectory(prefix="diffv2-s3-") as tmp:
            local = os.path.join(tmp, "file.json")
            self._fs.download_file(self.child(name), local)
            with open(local) as f:
                return json.load(f)

    def write_json(self, name: str, data: dict) -> None:
        with tempfile.TemporaryDirectory(prefix="diffv2-s3-") as tmp:
            local = os.path.join(tmp, "file.json")
            Path(local).write_text(json.dumps(data, indent=2) + "\n")
            self._fs.upload_file(local, self.child(name))

    def delete_keys(self, names: list[str]) -> None:
        """Delete exactly these objects (relative to the prefix), in this order, 1000 per request.

        Not through LitData's `S3FsProvider`, which deletes by raw key prefix (`train/chunk-0-1.bin` would
        also take `train/chunk-0-1.bin.bak`): only what `prepare` wrote may go (issue 24.1)."""
        from botocore import exceptions as boto

        keys = [f"{self.key}/{name}" for name in names]
        for first in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[first:first + 1000]]
            try:
                answer = self._preflight_client.delete_objects(Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True})
            except boto.ClientError as err:
                raise DataSettingError(self._client_error_message(err)) from None
            if answer.get("Errors"):
                error = answer["Errors"][0]
                raise DataError(f"could not delete {len(answer['Errors'])} object(s) under {self.url}/ (e.g. "
                                f"{error.get('Key')}: {error.get('Code')}); check the credentials may s3:DeleteObject")


# ---------------------------------------------------------------- opening a prepared prefix

def open_remote_folder(url: str, storage_options: dict | None = None) -> DataFolder:
    """`folder.open_folder` for `s3://bucket/prefix`: a prefix without the metadata file (written last by
    `prepare`) or an index.json holds no prepared data, whatever else it holds."""
    place = S3Prefix(url, storage_options)
    objects = place.list()
    folder = open_prepared(place, objects, redo=f"re-run `diffv2-lit prepare --output {place.url} --overwrite` (or copy the data again)")
    if folder is not None:
        return folder
    if PROGRESS_FILE in objects:  # prepare's own leftovers: --overwrite replaces exactly those
        raise DataError(f"{place.url} holds no prepared data ({len(objects)} object(s) of a prepare that did not "
                        f"finish, no {METADATA_FILE}); re-run `diffv2-lit prepare --input YOUR_TEXT --output "
                        f"{place.url} --overwrite`")
    if objects:
        raise DataError(f"{place.url} holds no prepared data ({len(objects)} object(s), no {METADATA_FILE}: not "
                        f"written by `diffv2-lit prepare`); prepare your text into a new prefix with `diffv2-lit "
                        f"prepare --input YOUR_TEXT --output {place.url}-prepared` and set data.data_dir to it")
    raise DataError(f"{place.url} holds no prepared data (nothing); create it with "
                    f"`diffv2-lit prepare --input YOUR_TEXT --output {place.url}`")


def allow_plain_http_endpoints() -> None:
    """Let LitData's obstore transfers use an `http://` endpoint, as its boto3 transfers already do.

    LitData builds obstore `S3Store`s for chunk transfers from its boto3 client's endpoint, but with fixed
    client options (`litdata.streaming.downloader._OBSTORE_CLIENT_OPTIONS`) that lack `allow_http`, so an
    S3-compatible server on `http://` (MinIO, Ceph, a local test server) fails with "BadScheme". The
    option only permits plain HTTP where the configured endpoint asks for it; https endpoints stay https.
    The dict is module state: set it before LitData starts workers (fork inherits it).
    """
    try:
        from litdata.streaming import downloader
    except ImportError:  # pragma: no cover - litdata is a dependency
        return
    options = getattr(downloader, "_OBSTORE_CLIENT_OPTIONS", None)
    if isinstance(options, dict):
        options.setdefault("allow_http", True)


# ---------------------------------------------------------------- the local cache of remote chunks

_PARTIAL_DOWNLOAD = re.compile(r"\.tmp\.(\d+)(\.[^/]*)?$")  # LitData: f"{path}.tmp.{pid}", boto3 adds ".XXXXXXXX"


def clean_cache(cache_dir: str | Path) -> list[Path]:
    """Remove what killed LitData readers leave in `cache_dir`; returns the removed paths.

    - partial downloads `chunk-*.bin.tmp.<pid>[.<random>]` (LitData's `Downloader._temp_download_path`,
      plus boto3's own temporary suffix) whose process is gone;
    - `*.lock` files (FileLock, one per downloaded file, never removed by LitData's S3 downloader) that no
      process holds.
    Files of live processes are left alone, so concurrent ranks and jobs sharing the folder are safe.
    """
    root = Path(cache_dir)
    if not root.is_dir():
        return []
    removed = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        if _is_orphan_partial(path):
            path.unlink(missing_ok=True)
            removed.append(path)
        elif path.suffix == ".lock" and _unlink_if_unheld(path):
            removed.append(path)
    return removed


def _is_orphan_partial(path: Path) -> bool:
    match = _PARTIAL_DOWNLOAD.search(path.name)
    return bool(match) and not process_alive(int(match.group(1)))


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _unlink_if_unheld(path: Path) -> bool:
    """Unlink a FileLock file while holding its flock; False (kept) if a process holds it.

    A process already waiting on the old file could then hold it while another creates a new one; LitData
    publishes every download by atomic rename, so the worst case is one duplicate download.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: leave lock files alone
        return False
    try:
        fd = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return False
    try:
        path.unlink(missing_ok=True)
    finally:
        os.close(fd)  # releases the lock
    return True

