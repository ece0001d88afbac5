"""The artifact store: one small set of functions over `file://`/plain paths and `s3://` URIs.

Every stage reads its inputs and writes its outputs through these functions, so a pipeline runs
unchanged on a laptop (local directory) and on a cluster (S3 or any S3-compatible server).

Guarantees:
- Writes are atomic. Locally a temp file in the same directory is renamed over the target; on S3 an
  object becomes visible only when its single PUT (or its multipart upload) completes. A reader
  never sees half a file, and a writer killed midway leaves nothing visible.
- Errors a user can cause (bad URI, missing bucket or key, access denied, unreachable endpoint after
  boto's own retries) surface as `UserError` with one line naming the URI.

S3 configuration is boto3's: the usual credential chain, `AWS_ENDPOINT_URL` (or
`AWS_ENDPOINT_URL_S3`) for S3-compatible servers, `AWS_RETRY_MODE`/`AWS_MAX_ATTEMPTS` for retries
(default here: standard mode, 5 attempts).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator
from urllib.parse import urlparse

from unsupft.errors import UserError

_MULTIPART_THRESHOLD = 64 * 1024 * 1024


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
        retries["max_attempts"] = 5
    config = Config(retries=retries or None, connect_timeout=10, read_timeout=120)
    return boto3.session.Session().client("s3", config=config)


# A boto3 client holds open connections; a forked child (DataLoader worker) makes its own.
os.register_at_fork(after_in_child=_s3_client.cache_clear)


def _split_s3(uri: str) -> tuple[str, str]:
    parsed = urlparse(normalize(uri))
    return parsed.netloc, parsed.path.lstrip("/")


@contextlib.contextmanager
def _s3_errors(uri: str) -> Iterator[None]:
    """Turn the S3 failures a user can cause into one line naming the URI."""
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    try:
        yield
    except S3UploadFailedError as exc:  # boto3's managed upload wraps the ClientError; unwrap it
        cause = exc.__context__
        if isinstance(cause, (ClientError, BotoCoreError)):
            with _s3_errors(uri):
                raise cause from None
        raise UserError(f"{uri}: upload failed: {exc}") from exc
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        reasons = {
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
        reason = reasons.get(code, f"{code or 'error'}: {error.get('Message', exc)}")
        raise UserError(f"{uri}: {reason}") from exc
    except NoCredentialsError as exc:
        raise UserError(f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)") from exc
    except BotoCoreError as exc:
        raise UserError(f"{uri}: {exc}") from exc


# ---------------------------------------------------------------------------------- reading ---


def read_bytes(uri: str) -> bytes:
    """The whole object at `uri`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _s3_errors(uri):
            return _s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    path = _local(uri)
    try:
        return path.read_bytes()
    except FileNotFoundError as exc:
        raise UserError(f"{uri}: no such file") from exc
    except IsADirectoryError as exc:
        raise UserError(f"{uri}: is a directory, expected a file") from exc


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


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
        with _s3_errors(uri):
            body = _s3_client().get_object(Bucket=bucket, Key=key)["Body"]
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
        with _s3_errors(uri):
            body = _s3_client().get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + size - 1}")["Body"]
            data = body.read()
    else:
        try:
            with _local(uri).open("rb") as f:
                data = os.pread(f.fileno(), size, offset)
        except FileNotFoundError as exc:
            raise UserError(f"{uri}: no such file") from exc
    return data


def version(uri: str) -> str:
    """A string that changes whenever the object at `uri` changes (size and ETag on S3, size and
    mtime locally): the key of caches derived from the object. A missing object is a `UserError`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _s3_errors(uri):
            head = _s3_client().head_object(Bucket=bucket, Key=key)
        return f"{head['ContentLength']}:{head.get('ETag', '')}"
    try:
        stat = _local(uri).stat()
    except FileNotFoundError as exc:
        raise UserError(f"{uri}: no such file") from exc
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def exists(uri: str) -> bool:
    """Whether an object (a file, not a prefix) exists at `uri`."""
    if is_s3(uri):
        from botocore.exceptions import ClientError

        bucket, key = _split_s3(uri)
        try:
            with _s3_errors(uri):
                _s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except UserError as exc:
            if isinstance(exc.__cause__, ClientError) and exc.__cause__.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise
    return _local(uri).is_file()


def list_prefix(uri: str) -> list[str]:
    """Names of all objects below `uri`, relative to it, sorted (recursive, files only)."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        prefix = f"{key}/" if key else ""
        names: list[str] = []
        with _s3_errors(uri):
            for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                names.extend(obj["Key"][len(prefix):] for obj in page.get("Contents", []))
        return sorted(names)
    root = _local(uri)
    if not root.is_dir():
        return []
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not p.name.startswith(".tmp-")
    )


def download_file(uri: str, path: str | os.PathLike) -> None:
    """Copy the object at `uri` to a local file (atomically)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _atomic_local_file(target) as tmp:
        if is_s3(uri):
            bucket, key = _split_s3(uri)
            with _s3_errors(uri):
                _s3_client().download_file(bucket, key, str(tmp))
        else:
            try:
                shutil.copyfile(_local(uri), tmp)
            except FileNotFoundError as exc:
                raise UserError(f"{uri}: no such file") from exc


# ---------------------------------------------------------------------------------- writing ---


@contextlib.contextmanager
def _atomic_local_file(target: Path) -> Iterator[Path]:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _local_parent_ok(uri: str, path: Path) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{uri}: {parent} is a file, not a directory")
            return


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (replacing what was there)."""
    if is_s3(uri):
        upload_stream(uri, io.BytesIO(data))
        return
    path = _local(uri)
    _local_parent_ok(uri, path)
    try:
        with _atomic_local_file(path) as tmp:
            tmp.write_bytes(data)
    except PermissionError as exc:
        raise UserError(f"{uri}: permission denied") from exc


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def upload_stream(uri: str, stream: IO[bytes]) -> None:
    """Write a stream to `uri` atomically; large streams go up as one multipart upload on S3."""
    if is_s3(uri):
        from boto3.s3.transfer import TransferConfig

        bucket, key = _split_s3(uri)
        with _s3_errors(uri):
            _s3_client().upload_fileobj(stream, bucket, key, Config=TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD))
        return
    path = _local(uri)
    _local_parent_ok(uri, path)
    with _atomic_local_file(path) as tmp, tmp.open("wb") as out:
        shutil.copyfileobj(stream, out, 1 << 20)


def upload_file(path: str | os.PathLike, uri: str) -> None:
    """Copy a local file to `uri` atomically."""
    with open(path, "rb") as stream:
        upload_stream(uri, stream)


def create_exclusive(uri: str, data: bytes) -> bool:
    """Create `uri` only if nothing exists there; False if it did. Used as a lock for run ids.

    S3: a conditional PUT (`If-None-Match: *`), atomic on the server. Locally: O_EXCL create of a
    temp-written file via a hard link, so the content is complete when the name appears.
    """
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        try:
            with _s3_errors(uri):
                _s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
            return True
        except UserError as exc:
            if "already exists" in str(exc) or "ConditionalRequestConflict" in str(exc):
                return False
            raise
    path = _local(uri)
    _local_parent_ok(uri, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.link(tmp_name, path)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp_name)


def delete(uri: str) -> None:
    """Delete one object; deleting what is not there is not an error."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        with _s3_errors(uri):
            _s3_client().delete_object(Bucket=bucket, Key=key)
        return
    _local(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> None:
    """Delete every object below `uri`."""
    if is_s3(uri):
        bucket, key = _split_s3(uri)
        names = list_prefix(uri)
        with _s3_errors(uri):
            for start in range(0, len(names), 1000):
                batch = [{"Key": join(key, n) if key else n} for n in names[start : start + 1000]]
                _s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
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
            with _s3_errors(src_uri):
                _s3_client().copy({"Bucket": sb, "Key": sk}, db, dk)
        else:
            with open_read(src_uri) as stream:
                upload_stream(dst_uri, stream)
    return names


def local_path(uri: str) -> Path | None:
    """The local filesystem path of a file/plain URI, or None for remote URIs."""
    return None if is_s3(uri) else _local(uri)
