"""A size-limited local cache of whole remote shards, safe for several processes.

Enabled through ``IOOptions(cache_dir=..., cache_max_bytes=...)`` (or the data config's
``cache: {dir, max_bytes}``, or ``--cache-dir``): :func:`wds_tools.io.open_range` on a remote
``.tar`` then fetches the whole shard once into the cache and reads it locally. The cache sits
between the transport (below: it downloads through :mod:`wds_tools.transport`) and the ``io``
front (above: it decides when to use the cache); it never calls back up.

- **Multi-node**: use one cache folder per node on local disk (``/tmp``, NVMe), shared by the
  node's ranks and DataLoader workers; a folder shared across nodes over NFS works only if
  ``fcntl`` locks do there, and gains nothing over streaming.

- **Keys**: the SHA-256 of the redacted URL (scheme, host, port, full path; no credentials) and
  of the object's version (size, ETag, Last-Modified), so two datasets with equal shard names
  never collide, and a shard re-written at the same URL is fetched again (the stale copy ages
  out). Checking the version costs one HEAD per shard open.
- **Atomic**: downloads go to a temp name in the cache folder and are renamed when complete and
  of the expected size; a reader never sees a partial file.
- **Several processes**: an entry is downloaded by one process while others wait on its lock
  (``fcntl.flock`` on one of 256 lock files); eviction runs under a folder-wide lock. A file
  evicted while another process reads it stays readable for that process (POSIX unlink).
- **Size limit**: before a download, least recently used entries (by mtime, refreshed on every
  use) are removed until the cached bytes plus downloads in progress plus the new shard fit.
  A shard larger than the whole limit is not cached (it is streamed instead).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Dict, Iterator, Optional, Tuple

from . import transport as wio

__all__ = ["ShardCache"]

log = logging.getLogger(__name__)
_TMP = ".part"
_STALE_TMP_S = 3600.0
_VERSION_TTL_S = 60.0


class ShardCache:
    """A cache folder holding at most ``max_bytes`` of shards (see the module docstring)."""

    _instances: Dict[Tuple[str, int], "ShardCache"] = {}
    _instances_lock = threading.Lock()

    def __init__(self, root: str, max_bytes: int):
        if max_bytes <= 0:
            raise ValueError("cache max_bytes must be > 0")
        self.root, self.max_bytes = os.path.abspath(root), int(max_bytes)
        os.makedirs(os.path.join(self.root, "locks"), exist_ok=True)
        self._versions: Dict[str, Tuple[float, wio.ObjectInfo]] = {}
        self.hits = self.misses = self.evictions = 0

    @classmethod
    def for_options(cls, opts: wio.IOOptions) -> "ShardCache":
        """The process-wide cache object for ``opts.cache_dir`` and ``opts.cache_max_bytes``."""
        if not opts.cache_dir:
            raise ValueError("IOOptions.cache_dir is not set")
        key = (os.path.abspath(opts.cache_dir), opts.cache_max_bytes)
        with cls._instances_lock:
            c = cls._instances.get(key)
            if c is None:
                c = cls._instances[key] = cls(opts.cache_dir, opts.cache_max_bytes)
            return c

    # -- naming ----------------------------------------------------------------------------
    def entry_name(self, url: str, version: str) -> str:
        h = hashlib.sha256(f"{wio.redact(url)}\n{version}".encode()).hexdigest()[:40]
        base = os.path.basename(wio.redact(url).rstrip("/"))[-80:] or "object"
        return f"{h}-{base}"

    def _info(self, url: str, opts: wio.IOOptions) -> wio.ObjectInfo:
        now = time.monotonic()
        hit = self._versions.get(url)
        if hit is not None and now - hit[0] < _VERSION_TTL_S:
            return hit[1]
        info = wio.object_info(url, opts)
        self._versions[url] = (now, info)
        return info

    @contextmanager
    def _flock(self, name: str) -> Iterator[None]:
        with open(os.path.join(self.root, "locks", name), "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- public ----------------------------------------------------------------------------
    def fetch(self, url: str, opts: wio.IOOptions = wio.DEFAULT) -> Optional[str]:
        """Local path of the whole object at ``url``, downloading it if needed.

        Objects larger than ``max_bytes`` are not cached: None is returned, and the caller
        streams the object instead."""
        info = self._info(url, opts)
        size = info.size
        if size > self.max_bytes:
            log.warning(
                "%s: %d bytes do not fit the %d-byte cache; streaming it",
                wio.redact(url),
                size,
                self.max_bytes,
            )
            return None
        name = self.entry_name(url, info.version)
        path = os.path.join(self.root, name)
        if self._touch(path):
            self.hits += 1
            return path
        with self._flock(f"{name[:2]}.lock"):
            if self._touch(path):  # another process fetched it while we waited
                self.hits += 1
                return path
            self.misses += 1
            self._make_room(size)
            self._download(url, path, size, opts)
        return path

    def cached_bytes(self) -> int:
        return sum(sz for _, sz, _ in self._entries(include_tmp=True))

    # -- internals -------------------------------------------------------------------------
    @staticmethod
    def _touch(path: str) -> bool:
        try:
            os.utime(path)  # mtime = last use, for LRU
            return True
        except FileNotFoundError:
            return False

    def _entries(self, include_tmp: bool):
        out = []
        with os.scandir(self.root) as it:
            for e in it:
                if not e.is_file() or (e.name.endswith(_TMP) and not include_tmp):
                    continue
                try:
                    st = e.stat()
                except FileNotFoundError:
                    continue
                out.append((e.path, st.st_size, st.st_mtime))
        return out

    def _make_room(self, need: int) -> None:
        with self._flock("evict.lock"):
            now = time.time()
            entries = []
            for path, size, mtime in self._entries(include_tmp=True):
                if path.endswith(_TMP) and now - mtime > _STALE_TMP_S:
                    _remove(path)  # left by a process that died mid-download
                    continue
                entries.append((path, size, mtime))
            total = sum(sz for _, sz, _ in entries)
            for path, size, _ in sorted((e for e in entries if not e[0].endswith(_TMP)), key=lambda e: e[2]):
                if total + need <= self.max_bytes:
                    break
                if _remove(path):
                    total -= size
                    self.evictions += 1
                    log.info("cache: evicted %s (%d bytes)", os.path.basename(path), size)

    def _download(self, url: str, path: str, size: int, opts: wio.IOOptions) -> None:
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}{_TMP}"
        try:
            got = 0
            with wio.open_direct(url, 0, size, opts) as src, open(tmp, "wb") as dst:
                while True:
                    b = src.read(opts.chunk_size)
                    if not b:
                        break
                    dst.write(b)
                    got += len(b)
            if got != size:
                raise IOError(f"{wio.redact(url)}: downloaded {got} of {size} bytes")
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise


def _remove(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except FileNotFoundError:
        return False
