"""Whole S3 shards on the local disk, shared by every unsupft process of a node: how samples are
read from S3 at the speed training needs.

A ranged GET per sample costs ~8 ms of request overhead (BENCHMARKS.md, "Reader"), so a DataLoader
worker that reads sample by sample delivers ~130 images/s from S3. Training reads in windows of a
few shards (`unsupft.train.batches.ShardWindows`) and evaluation in index order, so each shard is
needed for many consecutive samples: after `FETCH_AFTER_READS` samples of one shard, a process
fetches the shard whole (one streamed GET, `store.read_into`, retried like every store call) into
`$UNSUPFT_CACHE/shards/` and serves the rest with `pread`. Sparse reads (a few-shot subset spread
over a thousand shards) stay ranged GETs: they would otherwise download whole shards for a few
samples each.

The cache is node-wide: a shard's file is named by its URI and version, one process downloads it
under an exclusive `flock` (one of `LOCK_STRIPES` lock files, picked by the shard's name) while the others wait and then open the same
file, so DataLoader workers, DDP ranks and later stages on one node fetch each shard once (while it
stays cached). The download goes to an anonymous `O_TMPFILE` that is linked into place only when
complete and checked: a SIGKILL leaves nothing half-written. Its version (size and ETag of the
GET) must be the one the sample index was built from; a shard that changed on the server since is
one `error:` line, never bytes of two versions mixed.

Bounded: the folder is trimmed to `UNSUPFT_SHARD_CACHE_MB` (default 4096 MiB) before each new shard
lands, oldest used first, and each process keeps descriptors of at most half that; a removed file
that a process still reads lives on until it closes it, so disk use stays below about the budget
plus what the open readers hold. `UNSUPFT_SHARD_CACHE_MB=0` turns the cache off (every sample a
ranged GET, the former reader). Local shards never go through it: a `pread` is already cheap.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path

from unsupft import store
from unsupft.data.index import cache_dir
from unsupft.errors import UserError

CACHE_ENV = "UNSUPFT_SHARD_CACHE_MB"
DEFAULT_CACHE_MB = 4096.0
WINDOW_ENV = "UNSUPFT_SHUFFLE_WINDOW_MB"
# A quarter of the cache: the window being read and the next one's first shards fit beside other
# stages' shards. ImageNet-1k in 140 MB shards: 7 shards, ~9,000 images per window.
DEFAULT_WINDOW_MB = 1024.0
# Ranged GETs a process makes into one shard before fetching it whole: enough to keep sparse subsets
# ranged, few enough that a window costs at most this many slow reads per shard.
FETCH_AFTER_READS = 4
# Downloads lock one of this many lock files, chosen by the shard's name: the folder never holds
# more of them however many shards pass through it, and two shards that share a lock (a 1 in 256
# chance) are only fetched one after the other.
LOCK_STRIPES = 256


def _env_bytes(name: str, default_mb: float, meaning: str) -> int:
    raw = os.environ.get(name) or ""
    try:
        megabytes = float(raw) if raw else default_mb
    except ValueError:
        megabytes = -1.0
    if not 0 <= megabytes <= 2**30:
        raise UserError(f"{name}={raw!r}: expected {meaning}")
    return int(megabytes * 2**20)


def budget_bytes() -> int:
    """The node's shard cache size in bytes (`UNSUPFT_SHARD_CACHE_MB`; 0 turns the cache off)."""
    return _env_bytes(CACHE_ENV, DEFAULT_CACHE_MB, "MiB of disk for cached S3 shards (0 turns the cache off)")


def window_bytes() -> int:
    """Training's shuffle window in bytes of shards (`UNSUPFT_SHUFFLE_WINDOW_MB`; see
    `unsupft.train.batches.ShardWindows`). It decides the order, so a resume must keep it."""
    return _env_bytes(WINDOW_ENV, DEFAULT_WINDOW_MB, "MiB of shards that training shuffles together")


def cache_folder() -> Path:
    """Where cached shards go: `$UNSUPFT_CACHE/shards` (beside the sample indexes)."""
    return cache_dir() / "shards"


def _open_existing(path: Path) -> int | None:
    """A descriptor of the cached file, its mtime set to now (the eviction order), or None."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    with contextlib.suppress(OSError):
        os.utime(fd)
    return fd


def _link(fd: int, path: Path) -> None:
    """Give the anonymous file `fd` the name `path` (linkat with AT_SYMLINK_FOLLOW, which CPython
    uses only when given a directory descriptor); where that fails, only this process reads it."""
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with contextlib.suppress(OSError):
            os.link(f"/proc/self/fd/{fd}", path.name, dst_dir_fd=folder)
    finally:
        os.close(folder)


class ShardCache:
    """This process's reader of S3 shard bytes (see the module docstring)."""

    def __init__(self, folder: Path, budget: int) -> None:
        self.folder, self.budget = folder, budget
        self._held: collections.OrderedDict[tuple[str, str], tuple[int, int]] = collections.OrderedDict()
        self._ranged: collections.Counter[tuple[str, str]] = collections.Counter()
        self.fetched = 0  # shards this process downloaded (the tests and benchmarks count them)

    def read(self, uri: str, version: str, offset: int, size: int) -> bytes:
        """`size` bytes at `offset` of the shard `uri` as it was at `version`."""
        key = (uri, version)
        held = self._held.get(key)
        if held is None:
            if self.budget == 0 or (self._ranged[key] < FETCH_AFTER_READS and not self._path(key).exists()):
                self._ranged[key] += 1
                return store.read_range(uri, offset, size)
            fd = self._acquire(uri, version)
            if fd is None:  # no usable cache folder: read sample by sample
                return store.read_range(uri, offset, size)
            held = self._hold(key, fd)
        self._held.move_to_end(key)
        return os.pread(held[0], size, offset)

    def _path(self, key: tuple[str, str]) -> Path:
        return self.folder / f"{hashlib.sha256(json.dumps(key).encode()).hexdigest()}.tar"

    def _hold(self, key: tuple[str, str], fd: int) -> tuple[int, int]:
        """Keep `fd` open for the next reads, closing the least recently read ones past half the budget."""
        self._ranged.pop(key, None)
        self._held[key] = held = (fd, os.fstat(fd).st_size)
        while len(self._held) > 1 and sum(size for _, size in self._held.values()) > self.budget // 2:
            os.close(self._held.popitem(last=False)[1][0])
        return held

    def _acquire(self, uri: str, version: str) -> int | None:
        """A descriptor of the shard's cached file, downloaded first unless another process has;
        None when the cache folder cannot be written (a read-only `$UNSUPFT_CACHE`): the cache is
        then off for this process."""
        path = self._path((uri, version))
        fd = _open_existing(path)
        if fd is not None:
            return fd
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = open(self.folder / f"{int(path.stem[:8], 16) % LOCK_STRIPES:03d}.lock", "a")
        except OSError:
            self.budget = 0
            return None
        with lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            fd = _open_existing(path)
            return fd if fd is not None else self._download(uri, version, path)

    def _download(self, uri: str, version: str, path: Path) -> int:
        try:  # anonymous until complete: a killed download leaves no file behind
            out = os.fdopen(os.open(self.folder, os.O_TMPFILE | os.O_RDWR, 0o644), "w+b")
            shareable = True
        except (AttributeError, OSError):  # no O_TMPFILE here: this process alone reads its copy
            out, shareable = tempfile.TemporaryFile(dir=self.folder), False
        with out:
            got = store.read_into(uri, out)
            if got != version:
                raise UserError(f"{uri}: changed on the server since it was indexed (size:ETag {version} then, "
                                f"{got} now); run again to index the new version")
            out.flush()
            self.fetched += 1
            self._trim(int(version.split(":", 1)[0]))
            if shareable:
                _link(out.fileno(), path)
            return os.dup(out.fileno())

    def _trim(self, incoming: int) -> None:
        """Remove the least recently used cached shards until `incoming` more bytes fit the budget."""
        entries = []
        for entry in os.scandir(self.folder):
            if entry.name.endswith(".tar"):
                with contextlib.suppress(FileNotFoundError):
                    stat = entry.stat()
                    entries.append((stat.st_mtime, stat.st_size, entry.path))
        total = sum(size for _, size, _ in entries)
        for _, size, name in sorted(entries):
            if total + incoming <= self.budget:
                break
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            total -= size


_cache: ShardCache | None = None
_cache_for: tuple[int, str | None, str | None] = (0, None, None)


def shard_cache() -> ShardCache:
    """This process's `ShardCache` for the current settings (a forked DataLoader worker makes its
    own: descriptors are per process). Called per sample: it compares raw settings only."""
    global _cache, _cache_for
    wanted = (os.getpid(), os.environ.get("UNSUPFT_CACHE"), os.environ.get(CACHE_ENV))
    if _cache is None or _cache_for != wanted:
        _cache, _cache_for = ShardCache(cache_folder(), budget_bytes()), wanted
    return _cache
