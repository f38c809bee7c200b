"""A real S3-compatible server for the tests: moto's server (`moto[server]`, in the `dev` extra) on 127.0.0.1.

One server process per test session, on a free port. Authentication is switched on once a user, its
access key and the test bucket exist, so wrong credentials are refused as a real server refuses them.
Without moto's server the S3 tests skip with the reason, except under DIFFV2_LIT_REQUIRE_S3_TESTS=1
(`.ci/run` sets it), where a missing server fails them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

BUCKET = "diffv2-test"
REGION = "us-east-1"
REQUIRE_ENV = "DIFFV2_LIT_REQUIRE_S3_TESTS"
START_TIMEOUT_S = 60  # a cold start imports Flask and moto on a loaded CI machine


@dataclass
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    process: subprocess.Popen
    log: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables pointing at this server, isolated from any user configuration."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": REGION,
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def storage_options(self) -> dict[str, str]:
        """The same as keyword arguments of boto3.client("s3", ...), for `storage_options`."""
        return {"endpoint_url": self.endpoint, "aws_access_key_id": self.access_key,
                "aws_secret_access_key": self.secret_key, "region_name": REGION}

    def client(self):
        """A boto3 client for the tests' own look at the bucket (independent of the code under test)."""
        import boto3

        return boto3.client("s3", **self.storage_options())

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    """A port nothing listens on (free when asked; used at once)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(log_dir: Path) -> S3Server:
    _require_moto_server()
    port = free_port()
    log = log_dir / "moto_server.log"
    with open(log, "w") as log_file:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                   stdout=log_file, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(endpoint, process, log)
        access_key, secret_key = _create_user_and_bucket(endpoint)
        _post(endpoint, "/moto-api/reset-auth", b"0")  # from now on every request must be signed by that user
        _check_signatures_verify(endpoint, access_key, secret_key)
    except BaseException:
        process.kill()
        raise
    return S3Server(endpoint, access_key, secret_key, process, log)


def _require_moto_server() -> None:
    if all(importlib.util.find_spec(name) for name in ("moto", "flask", "flask_cors")):
        return
    reason = "moto's S3 server is not installed (pip install -e '.[dev]' installs moto[server])"
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def _wait_until_up(endpoint: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto server did not answer within {START_TIMEOUT_S} s: {log.read_text()[-2000:]}")


def _create_user_and_bucket(endpoint: str) -> tuple[str, str]:
    import boto3

    anyone = dict(endpoint_url=endpoint, aws_access_key_id="setup", aws_secret_access_key="setup", region_name=REGION)
    iam = boto3.client("iam", **anyone)
    iam.create_user(UserName="tests")
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName="tests", PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="tests")["AccessKey"]
    boto3.client("s3", **anyone).create_bucket(Bucket=BUCKET)
    return key["AccessKeyId"], key["SecretAccessKey"]


def _check_signatures_verify(endpoint: str, access_key: str, secret_key: str) -> None:
    """One correctly signed request must pass, or every S3 test would fail with a misleading 'credentials
    refused': moto 5.2.1-5.2.3 cannot verify the query-string signatures of botocore 1.43."""
    import boto3
    import botocore
    import moto
    from botocore.exceptions import ClientError

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=access_key,
                          aws_secret_access_key=secret_key, region_name=REGION)
    try:
        client.list_objects_v2(Bucket=BUCKET, Prefix="self-check/")
    except ClientError as err:
        code = err.response["Error"]["Code"]
        raise RuntimeError(f"moto {moto.__version__} refused a correctly signed request from botocore "
                           f"{botocore.__version__} ({code}): pip install -U 'moto[server]>=5.2.4'") from None


def _post(endpoint: str, path: str, body: bytes) -> None:
    request = urllib.request.Request(endpoint + path, data=body, method="POST", headers={"Content-Type": "text/plain"})
    urllib.request.urlopen(request, timeout=10).read()
