"""The artifact store against a local directory and a real S3 server (SeaweedFS on 127.0.0.1)."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from unsupft import store
from unsupft.errors import InfraError, UserError


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_small_round_trips(store_uri: str) -> None:
    store.write_bytes(store.join(store_uri, "a/b.bin"), b"\x00\x01payload")
    store.write_text(store.join(store_uri, "t.txt"), "héllo\n")
    store.write_json(store.join(store_uri, "j.json"), {"x": [1, 2], "y": None})
    assert store.read_bytes(store.join(store_uri, "a/b.bin")) == b"\x00\x01payload"
    assert store.read_text(store.join(store_uri, "t.txt")) == "héllo\n"
    assert store.read_json(store.join(store_uri, "j.json")) == {"x": [1, 2], "y": None}
    store.write_bytes(store.join(store_uri, "a/b.bin"), b"replaced")
    assert store.read_bytes(store.join(store_uri, "a/b.bin")) == b"replaced"


def test_large_object_round_trip_multipart(store_uri: str, tmp_path) -> None:
    data = os.urandom(store._MULTIPART_THRESHOLD + (1 << 20))
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    uri = store.join(store_uri, "big.bin")
    store.upload_file(src, uri)
    if store.is_s3(uri):  # a multipart upload's ETag is "<md5 of part md5s>-<part count>"
        bucket, key = store._split_s3(uri)
        assert "-" in store._s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
    back = tmp_path / "back.bin"
    store.download_file(uri, back)
    assert back.read_bytes() == data
    with store.open_read(uri) as stream:
        chunks = iter(lambda: stream.read(1 << 20), b"")
        assert b"".join(chunks) == data


def test_open_read_streams_in_pieces(store_uri: str) -> None:
    data = bytes(range(256)) * 1000
    uri = store.join(store_uri, "s.bin")
    store.upload_stream(uri, io.BytesIO(data))
    with store.open_read(uri) as stream:
        first = stream.read(1000)
        rest = stream.read()
    assert first == data[:1000] and first + rest == data


def test_list_exists_delete(store_uri: str) -> None:
    for name in ("ab/x", "ab/sub/y", "abc/z", "top"):
        store.write_bytes(store.join(store_uri, name), name.encode())
    assert store.list_prefix(store_uri) == ["ab/sub/y", "ab/x", "abc/z", "top"]
    assert store.list_prefix(store.join(store_uri, "ab")) == ["sub/y", "x"]  # not abc/
    assert store.list_prefix(store.join(store_uri, "nothing")) == []
    assert store.exists(store.join(store_uri, "ab/x"))
    assert not store.exists(store.join(store_uri, "ab"))  # a prefix is not an object
    assert not store.exists(store.join(store_uri, "missing"))
    store.delete(store.join(store_uri, "top"))
    store.delete(store.join(store_uri, "top"))  # deleting what is gone is fine
    assert not store.exists(store.join(store_uri, "top"))
    store.delete_prefix(store.join(store_uri, "ab"))
    assert store.list_prefix(store_uri) == ["abc/z"]


def test_missing_object_is_one_line_naming_uri(store_uri: str) -> None:
    uri = store.join(store_uri, "nope.json")
    with pytest.raises(UserError) as exc:
        store.read_json(uri)
    assert uri in _one_line(exc)


@pytest.mark.parametrize("direction", ["file->s3", "s3->s3", "s3->file"])
def test_copy_prefix(direction: str, s3_uri: str, tmp_path) -> None:
    roots = {"file": str(tmp_path / "local"), "s3": s3_uri}
    src_kind, dst_kind = direction.split("->")
    src = store.join(roots[src_kind], "src")
    dst = store.join(roots[dst_kind], "dst")
    files = {"m.pt": b"weights", "d/metrics.jsonl": b'{"step": 1}\n'}
    for name, data in files.items():
        store.write_bytes(store.join(src, name), data)
    assert sorted(store.copy_prefix(src, dst)) == sorted(files)
    assert {n: store.read_bytes(store.join(dst, n)) for n in store.list_prefix(dst)} == files


def test_create_exclusive_refuses_second(store_uri: str) -> None:
    uri = store.join(store_uri, "locks/run-1")
    assert store.create_exclusive(uri, b"first")
    assert not store.create_exclusive(uri, b"second")
    assert store.read_bytes(uri) == b"first"


def test_wrong_credentials_one_line(s3_uri: str, monkeypatch) -> None:
    store.write_bytes(store.join(s3_uri, "x"), b"1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    store._s3_client.cache_clear()
    with pytest.raises(UserError) as exc:
        store.read_bytes(store.join(s3_uri, "x"))
    assert "secret key" in _one_line(exc)
    with pytest.raises(UserError) as exc:
        store.write_bytes(store.join(s3_uri, "y"), b"2")
    assert store.join(s3_uri, "y") in _one_line(exc)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    store._s3_client.cache_clear()
    with pytest.raises(UserError) as exc:
        store.list_prefix(s3_uri)
    assert "access key" in _one_line(exc)


def test_missing_bucket_one_line(s3_env) -> None:
    uri = "s3://no-such-bucket-unsupft/data/x.bin"
    for action in (lambda: store.read_bytes(uri), lambda: store.write_bytes(uri, b"1"),
                   lambda: store.list_prefix("s3://no-such-bucket-unsupft/data")):
        with pytest.raises(UserError) as exc:
            action()
        message = _one_line(exc)
        assert "no-such-bucket-unsupft" in message and "bucket" in message


def test_unreachable_endpoint_one_line(s3_env, monkeypatch) -> None:
    import socket

    with socket.socket() as sock:  # a port that was free a moment ago and that nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    monkeypatch.setenv(store.RETRY_ENV, "1")
    store._s3_client.cache_clear()
    uri = "s3://bucket/key.json"
    with pytest.raises(InfraError) as exc:  # retried for the budget, then an infrastructure failure
        store.read_json(uri)
    message = _one_line(exc)
    assert uri in message and "unreachable" in message and f"127.0.0.1:{port}" in message


_SLOW_WRITER = textwrap.dedent(
    """
    import io, sys, time
    from unsupft import store

    class Slow(io.RawIOBase):
        # Serves `fast` bytes at once (enough for multipart parts to go up), then trickles forever.
        def __init__(self, fast):
            self.left = fast
        def readable(self):
            return True
        def readinto(self, buf):
            if self.left > 0:
                n = min(len(buf), self.left)
                buf[:n] = b"x" * n
                self.left -= n
                if self.left == 0:
                    print("streaming", flush=True)
                return n
            time.sleep(0.5)
            buf[:1] = b"y"
            return 1

    store.upload_stream(sys.argv[1], io.BufferedReader(Slow(int(sys.argv[2]))))
    """
)


def test_killed_writer_leaves_nothing_visible(store_uri: str, cli_env) -> None:
    uri = store.join(store_uri, "out/model.pt")
    fast = store._MULTIPART_THRESHOLD + (16 << 20)  # past the threshold: parts are being uploaded
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_WRITER, uri, str(fast)], env=cli_env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "streaming"
        time.sleep(1.0)  # let the uploader push parts / write the temp file
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not store.exists(uri)
    assert store.list_prefix(store_uri) == []


def test_uri_forms_normalize_to_one_place(tmp_path, monkeypatch):
    """A plain path, file:///abs and file://./rel (the default store of the pipeline examples) name the same place."""
    monkeypatch.chdir(tmp_path)
    expected = str(tmp_path / "runs")
    assert store.normalize("runs") == expected
    assert store.normalize("file://./runs") == expected
    assert store.normalize(f"file://{expected}") == expected
    assert store.normalize("s3://bucket/prefix/") == "s3://bucket/prefix"
    store.write_text("file://./runs/x.txt", "hi")
    assert store.read_text(str(tmp_path / "runs" / "x.txt")) == "hi"
    with pytest.raises(UserError, match="unsupported URI scheme 'gs'"):
        store.normalize("gs://bucket/x")


# ------------------------------------------------------------------------ modes and leftovers ---


@pytest.fixture
def umask_022():
    before = os.umask(0o022)
    yield
    os.umask(before)


def test_local_writes_honour_the_umask(tmp_path, umask_022) -> None:
    """Every local write path gives 0644 under umask 022 (mkstemp's 0600 used to survive the rename)."""
    store.write_bytes(str(tmp_path / "a/w.bin"), b"x")
    store.write_json(str(tmp_path / "a/j.json"), {})
    store.upload_stream(str(tmp_path / "a/u.bin"), io.BytesIO(b"y"))
    store.download_file(str(tmp_path / "a/u.bin"), tmp_path / "b/d.bin")
    assert store.create_exclusive(str(tmp_path / "a/lock"), b"z")
    for name in ("a/w.bin", "a/j.json", "a/u.bin", "b/d.bin", "a/lock"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
    os.umask(0o077)
    store.write_bytes(str(tmp_path / "a/private.bin"), b"x")
    assert (tmp_path / "a/private.bin").stat().st_mode & 0o777 == 0o600


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temp_files_swept_live_ones_kept(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(store, "_swept_dirs", set())
    host, old = store._HOST, time.time() - store.STALE_TEMP_SECONDS - 60
    leftovers = {  # name -> whether the first write into the directory must remove it
        f".tmp-model.pt~{host}~{_dead_pid()}~00ab": True,      # its writer on this host is gone
        f".tmp-model.pt~{host}~{os.getpid()}~00cd": False,      # a live writer (a concurrent process)
        ".tmp-config.json~other-node~1~00ef": False,          # another host, recently touched
        ".tmp-shard.tar~other-node~1~0123": True,             # another host, untouched for too long
        ".tmp-metrics.jsonl.k2j3h4": True,                    # an older version's mkstemp name, old
    }
    for name in leftovers:
        (tmp_path / name).write_bytes(b"partial")
    for name in (".tmp-shard.tar~other-node~1~0123", ".tmp-metrics.jsonl.k2j3h4"):
        os.utime(tmp_path / name, (old, old))
    store.write_bytes(str(tmp_path / "config.json"), b"{}")
    assert {p.name for p in tmp_path.iterdir()} == {"config.json", *(n for n, gone in leftovers.items() if not gone)}


def test_ingest_and_stage_outputs_readable_by_the_group_under_umask_022(tmp_path, cli_env) -> None:
    """The files a teammate reads on a shared disk: dataset.json, shards, sources.tsv, config.json..."""
    from PIL import Image

    (tmp_path / "photos").mkdir()
    for i in range(4):
        Image.new("RGB", (20 + i, 16), (40 * i, 90, 200)).save(tmp_path / "photos" / f"{i}.jpg")

    def run(*args) -> None:
        proc = subprocess.run([sys.executable, "-m", "unsupft", *map(str, args)], capture_output=True, text=True,
                              env={**cli_env, "OMP_NUM_THREADS": "1"}, preexec_fn=lambda: os.umask(0o022))
        assert proc.returncode == 0, proc.stderr

    run("ingest", tmp_path / "photos", tmp_path / "photo-set")
    run("ingest", "sklearn:digits", tmp_path / "digits", "--limit", "64", "--unlabeled")
    run("pretrain", "--data", tmp_path / "digits", "--out", tmp_path / "base", "--steps", 2, "--checkpoint-every", 1,
        "--batch-size", 16, "--queue-size", 32, "--workers", 0)
    files = [p for root in ("photo-set", "digits", "base") for p in (tmp_path / root).rglob("*")]
    names = {p.name for p in files}
    assert {"dataset.json", "sources.tsv", "shard-000000.tar", "config.json", "model.pt", "_DONE.json"} <= names
    for path in files:
        assert path.stat().st_mode & 0o777 == (0o755 if path.is_dir() else 0o644), path
