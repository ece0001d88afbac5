"""The artifact store: one small set of functions over `file://`/plain paths and `s3://` URIs.

Every stage reads its inputs and writes its outputs through these functions, so a pipeline runs
unchanged on a laptop (local directory) and on a cluster (S3 or any S3-compatible server).

Guarantees:
- Writes are atomic. Locally a temp file in the same directory is renamed over the target; on S3 an
  object becomes visible only when its single PUT (or its multipart upload) completes. A reader
  never sees half a file, and a writer killed midway leaves nothing visible.
- Local files get the mode the umask gives (0644 under umask 022), like any file a tool creates.
- No leftovers: a local temp file is named `.tmp-<target>~<host>~<pid>~<random>` (host: host name
  and pid namespace); the first write of a process into a directory removes the temp files there
  whose writer is gone (same host, pid no longer running) or that nobody touched for
  `STALE_TEMP_SECONDS` (a writer on another host of a shared disk). A concurrent live writer's
  temp file is left alone.
- Errors a user can cause (bad URI, missing bucket or key, access denied, bad credentials) surface
  as `UserError` with one line naming the URI and the cause.
- A local write that fails for its place's sake names the URI it wrote (not its temp file, which is
  removed): a full disk or quota as `InfraError` (exit 69; the rerun resumes), a read-only or
  forbidden place as `UserError` (`unsupft.errors.os_error`, `writing`).
- Transient failures (connection refused or reset, timeouts, 5xx, throttling) are retried with
  exponential backoff for `UNSUPFT_STORE_RETRY_SECONDS` (default 60) in all; past that they surface
  as `InfraError` (exit code 69), so a 2-second outage of the server does not end a stage, and one
  that lasts does not pass for bad input.

S3 configuration is boto3's: the usual credential chain, `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) for S3-compatible servers, `AWS_RETRY_MODE`/`AWS_MAX_ATTEMPTS` for boto's own
quick retries inside each attempt (default here: standard mode, 3 attempts).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import json
import os
import random
import re
import secrets
import shutil
import socket
import time
from pathlib import Path
from typing import IO, Any, Callable, Iterator, TypeVar
from urllib.parse import urlparse

from unsupft.errors import InfraError, UserError, os_error

_MULTIPART_THRESHOLD = 64 * 1024 * 1024
RETRY_ENV = "UNSUPFT_STORE_RETRY_SECONDS"
T = TypeVar("T")


def join(uri: str, *parts: str) -> str:
    """Join path parts onto a store URI (`s3://b/p` + `x` -> `s3://b/p/x`)."""
    out = uri.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def normalize(uri: str) -> str:
    """Canonical form: `s3://bucket/key` stays, `file:///x` and plain paths become absolute paths."""
    if is_s3(uri):
        parsed = urlparse(uri)
        if not parsed.netloc:
            raise UserError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
        return uri.rstrip("/") if parsed.path not in ("", "/") else f"s3://{parsed.netloc}"
    if uri.startswith(("file://./", "file://../")) or uri in ("file://.", "file://.."):
        return str(Path(uri[len("file://"):]).absolute())
    if "://" in uri:
        parsed = urlparse(uri)
        if parsed.scheme != "file":
            raise UserError(f"{uri}: unsupported URI scheme '{parsed.scheme}' (use a path, file:// or s3://)")
        if parsed.netloc not in ("", "localhost"):
            raise UserError(f"{uri}: file URIs take an absolute path (file:///path) or a relative one (file://./path)")
        return str(Path(parsed.path).absolute()) if parsed.path else str(Path.cwd())
    return str(Path(uri).absolute()) if uri else str(Path.cwd())


def _local(uri: str) -> Path:
    return Path(normalize(uri))


# --------------------------------------------------------------------------------------- S3 ---


@functools.lru_cache(maxsize=None)
def _s3_client():
    import boto3
    from botocore.config import Config

    retries: dict[str, Any] = {}
    if "AWS_RETRY_MODE" not in os.environ:
        retries["mode"] = "standard"
    if "AWS_MAX_ATTEMPTS" not in os.environ:
        retries["max_attempts"] = 3
    config = Config(retries=retries or None, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", config=config)


# A boto3 client holds open connections; a forked child (DataLoader worker) makes its own.
os.register_at_fork(after_in_child=_s3_client.cache_clear)


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(normalize(uri))
    return parsed.netloc, parsed.path.lstrip("/")


# Error codes and HTTP statuses of failures that go away by themselves (server restarting, overloaded).
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
                    "InternalError", "ServiceUnavailable", "503", "500", "502", "504", "OperationAborted"}
_REASONS = {
    "NoSuchBucket": "no such bucket",
    "NoSuchKey": "no such object",
    "404": "not found",
    "NotFound": "not found",
    "AccessDenied": "access denied",
    "403": "access denied",
    "InvalidAccessKeyId": "the access key is not known to the server",
    "SignatureDoesNotMatch": "the secret key does not match",
    "PreconditionFailed": "it already exists",
}


class _Transient(Exception):
    """A store failure worth retrying; `reason` says what happened, for the message after giving up."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def env_seconds(name: str, default: float, low: float, high: float) -> float:
    """A duration in seconds from the environment variable `name` (`default` when unset), in [low, high]."""
    raw = os.environ.get(name)
    try:
        value = float(raw) if raw else default
    except ValueError:
        raise UserError(f"{name}={raw!r}: expected a number of seconds") from None
    if not low <= value <= high:
        raise UserError(f"{name}={raw!r}: expected seconds in [{low:g}, {high:g}]")
    return value


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Classify S3 failures: a user's (`UserError`, one line naming the URI) or transient (`_Transient`)."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (BotoCoreError, ClientError, ConnectionError, HTTPClientError,
                                     NoCredentialsError, ResponseStreamingError)
    from urllib3.exceptions import HTTPError as Urllib3Error

    try:
        yield
    except S3UploadFailedError as exc:  # boto3's managed upload wraps the ClientError; unwrap it
        cause = exc.__context__
        if isinstance(cause, (ClientError, BotoCoreError)):
            with _s3_errors(uri):
                raise cause from None
        raise _Transient(f"upload failed: {exc}") from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        if code in _TRANSIENT_CODES or status >= 500:
            raise _Transient(f"the server answered {code or status}: {error.get('Message', '')}".rstrip(": ")) from exc
        reason = _REASONS.get(code, f"{code or 'error'}: {error.get('Message', exc)}")
        raise UserError(f"{uri}: {reason}") from exc
    except NoCredentialsError as exc:
        raise UserError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)") from exc
    except (ConnectionError, HTTPClientError, ResponseStreamingError, Urllib3Error, OSError) as exc:
        if isinstance(exc, OSError) and os_error(exc) is not None:
            raise  # this machine's disk (a download's target), not the server: no retry
        endpoint = _s3_client().meta.endpoint_url
        raise _Transient(f"the S3 endpoint {endpoint} is unreachable or dropped the connection ({exc})") from exc
    except BotoCoreError as exc:
        raise UserError(f"{uri}: {exc}") from exc


def _retrying(uri: str, operation: Callable[[], T], rewind: Callable[[], None] | None = None) -> T:
    """Run one S3 operation, retrying transient failures with backoff for `UNSUPFT_STORE_RETRY_SECONDS`
    (default 60). `rewind` resets an upload's source stream before a retry (or raises when it cannot).
    """
    budget = env_seconds(RETRY_ENV, 60.0, 0, 86400)
    deadline = time.monotonic() + budget
    delay = 0.25
    while True:
        try:
            with _s3_errors(uri):
                return operation()
        except _Transient as exc:
            if time.monotonic() + delay > deadline:
                raise InfraError(f"{uri}: {exc.reason}; gave up after {budget:g}s of retries "
                                 f"({RETRY_ENV} sets how long)") from exc
            time.sleep(delay * (0.5 + random.random() / 2))
            delay = min(delay * 2, 8.0)
            if rewind is not None:
                rewind()


@functools.lru_cache(maxsize=256)
def _bucket_exists(bucket: str) -> bool:
    """Whether `bucket` exists (asked only after a 404, where HEAD cannot tell a missing bucket)."""
    try:
        _retrying(f"s3://{bucket}", lambda: _s3_client().head_bucket(Bucket=bucket))
        return True
    except UserError as exc:
        if _not_found(exc, ("404", "NoSuchBucket", "NotFound")):
            return False
        raise


# ---------------------------------------------------------------------------------- reading ---


def read_bytes(uri: str) -> bytes:
    """The whole object at `uri`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        return _missing_bucket_named(uri, lambda: _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
    path = _local(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise UserError(f"{uri}: no such file") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{uri}: is a directory, expected a file") from exc


def read_text(uri: str) -> str:
    data = read_bytes(uri)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{uri}: not UTF-8 text (byte {exc.start})") from None


def read_json(uri: str) -> Any:
    data = read_bytes(uri)
    try:
        return json.loads(data)
    except json.JSONDecodeError as exc:
        raise UserError(f"{uri}: not valid JSON ({exc.msg} at line {exc.lineno})") from exc


@contextlib.contextmanager
def open_read(uri: str) -> Iterator[IO[bytes]]:
    """Stream the object at `uri` without holding it in memory."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        body = _retrying(uri, lambda: _s3_client().get_object(Bucket=bucket, Key=key)["Body"])
        try:
            yield body
        finally:
            body.close()
        return
    path = _local(uri)
    try:
        stream = path.open("rb")
    except FileNotFoundError as exc:
        raise UserError(f"{uri}: no such file") from exc
    with stream:
        yield stream


def read_range(uri: str, offset: int, size: int) -> bytes:
    """Up to `size` bytes of the object at `uri` from byte `offset` (a ranged GET on S3, a pread
    locally; fewer at its end): how an indexed shard's member is read without reading the shard."""
    if size <= 0:
        return b""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        byte_range = f"bytes={offset}-{offset + size - 1}"
        return _retrying(uri, lambda: _s3_client().get_object(Bucket=bucket, Key=key, Range=byte_range)["Body"].read())
    try:
        with _local(uri).open("rb") as f:
            return os.pread(f.fileno(), size, offset)
    except FileNotFoundError as exc:
        raise UserError(f"{uri}: no such file") from exc


def read_into(uri: str, out: IO[bytes]) -> str:
    """Copy the whole S3 object at `uri` into the seekable `out` (one streamed GET; a transient
    failure midway starts again from byte 0) and return the version (as `version()` spells it) of
    the bytes read, so a caller can tell that the object changed since it last looked."""
    bucket, key = _split_s3(uri)

    def copy() -> str:
        out.seek(0)
        out.truncate()
        response = _s3_client().get_object(Bucket=bucket, Key=key)
        with contextlib.closing(response["Body"]) as body:
            while chunk := body.read(1 << 20):
                try:
                    out.write(chunk)
                except OSError as exc:  # the local disk (full?), not the server: no retry
                    raise InfraError(f"{uri}: cannot write its local copy ({exc})") from exc
        return f"{response['ContentLength']}:{response.get('ETag', '')}"

    return _missing_bucket_named(uri, copy)


def version(uri: str) -> str:
    """A string that changes whenever the object at `uri` changes (size and ETag on S3, size and
    mtime locally): the key of caches derived from the object. A missing object is a `UserError`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        head = _missing_bucket_named(uri, lambda: _s3_client().head_object(Bucket=bucket, Key=key))
        return f"{head['ContentLength']}:{head.get('ETag', '')}"
    try:
        stat = _local(uri).stat()
    except FileNotFoundError as exc:
        raise UserError(f"{uri}: no such file") from exc
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def _not_found(exc: UserError, codes: tuple[str, ...] = ("404", "NoSuchKey", "NotFound")) -> bool:
    """Whether `exc` came from an S3 answer with one of these "not found" codes."""
    from botocore.exceptions import ClientError

    cause = exc.__cause__
    return isinstance(cause, ClientError) and cause.response.get("Error", {}).get("Code") in codes


def _missing_bucket_named(uri: str, operation: Callable[[], T]) -> T:
    """`_retrying(uri, operation)`, where a "not found" whose bucket is missing says so (HEAD cannot
    tell them apart)."""
    try:
        return _retrying(uri, operation)
    except UserError as exc:
        bucket = _split_s3(uri)[0]
        if _not_found(exc) and not _bucket_exists(bucket):
            raise UserError(f"{uri}: no such bucket '{bucket}'") from exc
        raise


def exists(uri: str) -> bool:
    """Whether an object (a file, not a prefix) exists at `uri`; a missing bucket is an error."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            _missing_bucket_named(uri, lambda: _s3_client().head_object(Bucket=bucket, Key=key))
            return True
        except UserError as exc:
            if _not_found(exc):  # the object is missing, not the bucket (that one is named above)
                return False
            raise
    return _local(uri).is_file()


def list_prefix(uri: str) -> list[str]:
    """Names of all objects below `uri`, relative to it, sorted (recursive, files only)."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        prefix = f"{key}/" if key else ""

        def listing() -> list[str]:
            pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            return [obj["Key"][len(prefix):] for page in pages for obj in page.get("Contents", [])]

        return sorted(_retrying(uri, listing))
    root = _local(uri)
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(_TEMP_PREFIX)
    )


def download_file(uri: str, path: str | os.PathLike) -> None:
    """Copy the object at `uri` to a local file (atomically)."""
    target = Path(path)
    with writing(str(target)), _atomic_local_file(target) as tmp:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            _retrying(uri, lambda: _s3_client().download_file(bucket, key, str(tmp)))
        else:
            try:
                shutil.copyfile(_local(uri), tmp)
            except FileNotFoundError as exc:
                raise UserError(f"{uri}: no such file") from exc


# ---------------------------------------------------------------------------------- writing ---


# A temp file older than this whose writer cannot be checked (another host) is a leftover: writes
# touch their temp file continuously and rename it within seconds to minutes.
STALE_TEMP_SECONDS = 3600
_TEMP_PREFIX = ".tmp-"
_TEMP_OWNER = re.compile(r"~(?P<host>[^~]*)~(?P<pid>\d+)~[0-9a-f]+$")


def _pid_namespace() -> str:
    """Who can see our pids: the host name plus, on Linux, the pid namespace (two containers with one
    host name and one disk must not judge each other's pids)."""
    try:
        namespace = os.readlink("/proc/self/ns/pid").strip("pid:[]")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}{'-' + namespace if namespace else ''}".replace("~", "-")


_HOST = _pid_namespace()
_swept_dirs: set[Path] = set()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _sweep_stale_temps(directory: Path) -> None:
    """Remove the temp files a killed writer left in `directory` (once per process and directory)."""
    if directory in _swept_dirs:
        return
    _swept_dirs.add(directory)
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(_TEMP_PREFIX):
            continue
        owner = _TEMP_OWNER.search(entry.name)
        try:
            if owner and owner["host"] == _HOST:
                stale = not _process_alive(int(owner["pid"]))
            else:
                stale = now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMP_SECONDS
            if stale and entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
        except OSError:  # renamed by its writer or removed by another sweeper meanwhile
            continue


def _create_temp(target: Path) -> tuple[int, Path]:
    """An open, new, empty temp file beside `target`, named after its owner process.

    Created with mode 0666 so the umask decides the final mode (mkstemp's 0600 would survive the
    rename and lock teammates out of a shared data set).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_temps(target.parent)
    while True:
        tmp = target.parent / f"{_TEMP_PREFIX}{target.name[:100]}~{_HOST}~{os.getpid()}~{secrets.token_hex(4)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666), tmp
        except FileExistsError:
            continue


@contextlib.contextmanager
def _atomic_local_file(target: Path) -> Iterator[Path]:
    fd, tmp = _create_temp(target)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(uri: str) -> Iterator[None]:
    """Writes to the local `uri` inside: a failure `os_error` knows (disk full, read-only, permission
    denied) becomes its one-line error naming `uri`; any other stays as it is."""
    try:
        yield
    except OSError as exc:
        error = os_error(exc, uri)
        if error is None:
            raise
        raise error from exc


def _local_parent_ok(uri: str, path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{uri}: {parent} is a file, not a directory")
            return


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (replacing what was there)."""
    upload_stream(uri, io.BytesIO(data))


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _rewind(uri: str, stream: IO[bytes], start: int | None) -> None:
    if start is None:
        raise InfraError(f"{uri}: the upload failed and its source stream cannot be read again")
    stream.seek(start)


class _KeepOpen:
    """A stream whose `close` does nothing: boto closes what it uploaded, even after a failure,
    and a retry reads the same stream again from where the first try started."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def close(self) -> None:
        pass


def upload_stream(uri: str, stream: IO[bytes]) -> None:
    """Write a stream to `uri` atomically; large streams go up as one multipart upload on S3."""
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = _split_s3(uri)
        start = stream.tell() if stream.seekable() else None
        _retrying(uri, lambda: _s3_client().upload_fileobj(
            _KeepOpen(stream), bucket, key, Config=TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD)),
            rewind=lambda: _rewind(uri, stream, start))
        return
    path = _local(uri)
    _local_parent_ok(uri, path)
    with writing(uri), _atomic_local_file(path) as tmp, tmp.open("wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)


def upload_file(path: str | os.PathLike, uri: str) -> None:
    """Copy a local file to `uri` atomically."""
    with open(path, "rb") as stream:
        upload_stream(uri, stream)


def _version(data: bytes) -> str:
    """A local object's version: the hash of its content (S3 uses the ETag)."""
    return hashlib.sha256(data).hexdigest()


def create_exclusive(uri: str, data: bytes) -> str | None:
    """Create `uri` only if nothing exists there: its version (for `replace_if`), or None if it did.

    S3: a conditional PUT (`If-None-Match: *`), atomic on the server. Locally: a temp-written file
    hard-linked to the name (O_EXCL semantics), so the content is complete when the name appears.
    """
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            return _retrying(uri, lambda: _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*"))["ETag"]
        except UserError as exc:
            if "already exists" in str(exc) or "ConditionalRequestConflict" in str(exc):
                return None
            raise
    path = _local(uri)
    _local_parent_ok(uri, path)
    with writing(uri):
        fd, tmp_name = _create_temp(path)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            os.link(tmp_name, path)
            return _version(data)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp_name)


def read_versioned(uri: str) -> tuple[bytes, str] | None:
    """The object at `uri` and its version, or None when there is none."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            response = _retrying(uri, lambda: _s3_client().get_object(Bucket=bucket, Key=key))
            return _retrying(uri, response["Body"].read), response["ETag"]
        except UserError as exc:
            if _not_found(exc):
                return None
            raise
    try:
        with open(_local(uri), "rb") as stream:
            fcntl.flock(stream, fcntl.LOCK_SH)  # never half of a concurrent `replace_if`
            data = stream.read()
    except FileNotFoundError:
        return None
    return data, _version(data)


def replace_if(uri: str, data: bytes, version: str) -> str | None:
    """Replace the object at `uri` only if it is still at `version`: the new version, or None.

    The compare-and-swap a lease needs. S3: a conditional PUT (`If-Match: <etag>`). Locally: the
    file is rewritten in place under an exclusive `flock`, which `read_versioned` also takes.
    """
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            return _retrying(uri, lambda: _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfMatch=version))["ETag"]
        except UserError as exc:
            if "already exists" in str(exc) or _not_found(exc) or "ConditionalRequestConflict" in str(exc):
                return None
            raise
    with writing(uri):
        try:
            stream = open(_local(uri), "r+b")
        except FileNotFoundError:
            return None
        with stream:
            fcntl.flock(stream, fcntl.LOCK_EX)
            if _version(stream.read()) != version:
                return None
            stream.seek(0)
            stream.truncate()
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
    return _version(data)


def delete(uri: str) -> None:
    """Delete one object; deleting what is not there is not an error."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        _retrying(uri, lambda: _s3_client().delete_object(Bucket=bucket, Key=key))
        return
    with writing(uri):
        _local(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    """Delete every object below `uri`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        names = list_prefix(uri)
        for start in range(0, len(names), 1000):
            batch = [{"Key": join(key, n) if key else n} for n in names[start : start + 1000]]
            _retrying(uri, lambda: _s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True}))
        return
    shutil.rmtree(_local(uri), ignore_errors=True)


def copy_prefix(src: str, dst: str) -> list[str]:
    """Copy every object below `src` to the same relative names below `dst`; returns the names."""
    names = list_prefix(src)
    for name in names:
        src_uri, dst_uri = join(src, name), join(dst, name)
        if is_s3(src) and is_s3(dst):
            sb, sk = _split_s3(src_uri)
            db, dk = _split_s3(dst_uri)
            _retrying(src_uri, lambda: _s3_client().copy({"Bucket": sb, "Key": sk}, db, dk))
        else:
            with open_read(src_uri) as stream:
                upload_stream(dst_uri, stream)
    return names


def local_path(uri: str) -> Path | None:
    """The local filesystem path of a file/plain URI, or None for remote URIs."""
    return None if is_s3(uri) else _local(uri)
