"""Shared fixtures: a real S3-compatible server (SeaweedFS `weed mini`) on 127.0.0.1.

The server checks signatures (an identity with a known key pair is configured) and conditional
writes, so the store's credential and lock tests run against the real behaviour rather than a
lenient mock. One server serves the whole session; every test gets a fresh prefix in one bucket.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from tests import seaweedfs
from tests.seaweedfs import S3Server


@pytest.fixture(scope="session", autouse=True)
def index_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Sample indexes go to a session directory (stage subprocesses inherit it), not to ~/.cache."""
    path = tmp_path_factory.mktemp("cache")
    before = os.environ.get("UNSUPFT_CACHE")
    os.environ["UNSUPFT_CACHE"] = str(path)
    yield path
    if before is None:
        del os.environ["UNSUPFT_CACHE"]
    else:
        os.environ["UNSUPFT_CACHE"] = before


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS S3 server for the session, with one bucket, stopped at the end."""
    with contextlib.ExitStack() as stack:
        try:
            server = stack.enter_context(seaweedfs.serve(tmp_path_factory.mktemp("weed"), bucket="unsupft-test"))
        except RuntimeError as exc:  # no weed binary, or it would not start: say why, once
            pytest.fail(f"could not start SeaweedFS: {exc}")
        yield server


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

    from unsupft.stages.ingest import ingest_command

    def run(*args) -> None:
        result = CliRunner().invoke(ingest_command, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output

    return run


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for training tests: on a shared 2-core machine, OpenMP threads spinning
    against other processes made small training steps 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
