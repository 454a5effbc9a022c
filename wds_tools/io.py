"""The read front of ``wds_tools``: ``open_range`` and friends, with the shard cache as policy.

Layers run one way: :mod:`wds_tools.transport` (local, HTTP, S3 openers, retries,
resume-at-byte, object size and version, redaction) at the bottom; :mod:`wds_tools.cache`
(whole remote shards kept in a local folder) above it; this module on top. Every reader in the
package reads through here, so a cache configured once (``IOOptions(cache_dir=...)``, the data
config's ``cache:``, ``--cache-dir``) applies everywhere.

The transport's public names are re-exported, so ``from wds_tools import io as wio`` gives the
whole I/O surface: ``IOOptions``, ``redact``, ``scrub``, ``join_url``, ``is_remote``...
"""

from __future__ import annotations

import json
from typing import Any, Optional
from urllib.parse import urlsplit

from .cache import ShardCache
from .transport import (
    DEFAULT,
    IOOptions,
    IOStats,
    ObjectInfo,
    check_range,
    is_remote,
    join_url,
    local_path,
    object_info,
    open_direct,
    open_local,
    redact,
    reset_clients,
    scrub,
    stats,
)

__all__ = [
    "IOOptions",
    "IOStats",
    "ObjectInfo",
    "DEFAULT",
    "stats",
    "open_range",
    "read_range",
    "read_bytes",
    "read_json",
    "object_size",
    "object_version",
    "object_info",
    "join_url",
    "is_remote",
    "redact",
    "scrub",
    "local_path",
    "reset_clients",
    "readinto_full",
]


def _cacheable(url: str, opts: IOOptions) -> bool:
    return (
        bool(opts.cache_dir)
        and url.startswith(("http://", "https://", "s3://"))
        and urlsplit(url).path.endswith(".tar")
    )


def open_range(url: str, start: int = 0, end: Optional[int] = None, opts: IOOptions = DEFAULT):
    """A buffered binary stream over bytes ``[start, end)`` of ``url`` (``end=None``: to the end).

    With ``opts.cache_dir`` set, a remote ``.tar`` shard is fetched whole into the cache once
    and read from there; everything else streams through the transport, which resumes broken
    remote streams at the byte where they broke. Nothing is requested until the first read
    (except the cache's version check).
    """
    if _cacheable(url, opts):
        check_range(url, start, end)  # before a whole-shard download, not after
        path = ShardCache.for_options(opts).fetch(url, opts)
        if path is not None:
            return open_local(path, start, end, opts)
    return open_direct(url, start, end, opts)


def read_range(url: str, start: int, end: int, opts: IOOptions = DEFAULT) -> bytes:
    """Exactly the bytes ``[start, end)``; a short object raises ``IOError``."""
    with open_range(url, start, end, opts) as f:
        data = f.read(end - start)
    if len(data) != end - start:
        raise IOError(f"{redact(url)}: got {len(data)} of {end - start} bytes at {start} (object truncated?)")
    return data


def read_bytes(url: str, opts: IOOptions = DEFAULT) -> bytes:
    """The whole object (retried and resumed like any remote read; a body shorter than its
    Content-Length counts as a dropped connection, not as the end)."""
    with open_range(url, 0, None, opts) as f:
        return f.read()


def read_json(url: str, opts: IOOptions = DEFAULT) -> Any:
    try:
        return json.loads(read_bytes(url, opts))
    except ValueError as e:
        raise ValueError(f"{redact(url)}: not valid JSON: {e}") from None


def object_size(url: str, opts: IOOptions = DEFAULT) -> int:
    """Size in bytes of a local file or remote object."""
    return object_info(url, opts).size


def object_version(url: str, opts: IOOptions = DEFAULT) -> str:
    """A string that changes when the object changes (see ``transport.ObjectInfo``)."""
    return object_info(url, opts).version


def readinto_full(f: Any, buf: Any) -> int:
    """Fill ``buf`` (a uint8 numpy array) from the raw stream under the buffered ``f`` (an
    ``open_range`` stream read only through this function, so its buffer holds nothing); the
    bytes read (fewer only at the end of
    the stream). For a read no larger than the stream's buffer, ``f.readinto`` would read into
    that buffer and copy out again: reading the raw stream saves the second copy (about a tenth
    of the reader's instructions per sample)."""
    raw = getattr(f, "raw", f)
    view = buf.data  # a memoryview of the array
    got, n = 0, len(buf)
    while got < n:
        k = raw.readinto(view[got:])
        if not k:
            break
        got += k
    return got
