"""Byte access to local files, HTTP(S) and S3, with ranges and resumable retries.

Every opener returns a binary stream over ``[start, end)`` of one object. Remote streams that
drop mid-way are re-opened at the byte where they broke (with exponential backoff), so callers
see one uninterrupted stream or, when retries run out, an ``IOError`` naming the URL.
``pipe:`` URLs are refused unless explicitly allowed. URLs are redacted (no credentials, no
query strings such as signatures) in every message.
"""
from __future__ import annotations

import io
import json
import logging
import os
import random
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import urljoin, urlsplit, urlunsplit

__all__ = ["IOOptions", "open_range", "read_range", "read_bytes", "read_json", "object_size",
           "join_url", "is_remote", "redact", "local_path"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IOOptions:
    """How remote reads behave. ``allow_pipe`` lets ``pipe:CMD`` URLs run a shell command."""

    timeout: float = 30.0          # seconds to connect / between bytes
    max_retries: int = 8           # re-opens of one stream before giving up
    backoff: float = 0.25          # first retry delay, doubled each time (with jitter)
    max_backoff: float = 8.0
    allow_pipe: bool = False
    chunk_size: int = 1 << 20


DEFAULT = IOOptions()


def redact(url: str) -> str:
    """The URL without user info and query string (credentials, signatures)."""
    if "://" not in url:
        return url
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "s3://", "pipe:"))


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join_url(base: str, rel: str) -> str:
    """Resolve ``rel`` against the file ``base`` (a manifest or index) that names it."""
    if "://" in rel or rel.startswith("pipe:"):
        return rel
    if base.startswith(("http://", "https://")):
        return urljoin(base, rel)
    if base.startswith("s3://"):
        head, _, _ = base.rpartition("/")
        return head + "/" + rel
    if os.path.isabs(rel):
        return rel
    return os.path.normpath(os.path.join(os.path.dirname(local_path(base)), rel))


# --- local ---------------------------------------------------------------------------------

class _Window(io.RawIOBase):
    """A byte window ``[start, end)`` of an underlying seekable file."""

    def __init__(self, f, start: int, end: Optional[int]):
        self._f, self._left = f, None if end is None else end - start
        f.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = len(b) if self._left is None else min(len(b), self._left)
        if n <= 0:
            return 0
        got = self._f.readinto(memoryview(b)[:n])
        if self._left is not None:
            self._left -= got
        return got

    def close(self) -> None:
        self._f.close()
        super().close()


# --- remote, resumable ---------------------------------------------------------------------

class _Resuming(io.RawIOBase):
    """Stream ``[start, end)`` through ``opener(pos, end)``; re-open at ``pos`` on failure."""

    def __init__(self, url: str, opener, start: int, end: Optional[int], opts: IOOptions):
        self.url, self._opener, self._pos, self._end, self._opts = url, opener, start, end, opts
        self.retries = 0
        self._body = self._retry(lambda: opener(start, end))

    def readable(self) -> bool:
        return True

    def _retry(self, fn):
        delay = self._opts.backoff
        while True:
            try:
                return fn()
            except _Permanent:
                raise
            except Exception as e:  # noqa: BLE001 - network errors come in many types
                self.retries += 1
                if self.retries > self._opts.max_retries:
                    raise IOError(f"{redact(self.url)}: giving up after {self._opts.max_retries} "
                                  f"retries at byte {self._pos}: {_short(e)}") from None
                log.warning("%s: %s; retrying at byte %d in %.2fs", redact(self.url), _short(e),
                            self._pos, delay)
                time.sleep(delay * (0.5 + random.random()))
                delay = min(delay * 2, self._opts.max_backoff)

    def readinto(self, b) -> int:
        if self._end is not None and self._pos >= self._end:
            return 0

        def attempt():
            if self._body is None:
                self._body = self._opener(self._pos, self._end)
            try:
                data = self._body.read(len(b))
            except Exception:
                self._drop()
                raise
            if not data and self._end is not None and self._pos < self._end:
                self._drop()
                raise IOError(f"connection closed at byte {self._pos} before byte {self._end}")
            return data

        data = self._retry(attempt)
        n = len(data)
        b[:n] = data
        self._pos += n
        return n

    def _drop(self) -> None:
        try:
            if self._body is not None:
                self._body.close()
        except Exception:  # noqa: BLE001
            pass
        self._body = None

    def close(self) -> None:
        self._drop()
        super().close()


class _Permanent(IOError):
    """An error that retrying cannot fix (404, 403, bad range)."""


def _short(e: BaseException) -> str:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    return re.sub(r"https?://\S+", lambda m: redact(m.group(0)), msg)[:200]


_local = threading.local()


def _http_session():
    s = getattr(_local, "http", None)
    if s is None or getattr(_local, "pid", None) != os.getpid():
        import requests
        s = requests.Session()
        _local.http, _local.pid = s, os.getpid()
    return s


def _http_opener(url: str, opts: IOOptions):
    def open_at(pos: int, end: Optional[int]):
        headers = {}
        if pos or end is not None:
            headers["Range"] = f"bytes={pos}-" + ("" if end is None else str(end - 1))
        r = _http_session().get(url, headers=headers, stream=True, timeout=opts.timeout)
        if r.status_code in (404, 403, 401, 410, 416):
            r.close()
            raise _Permanent(f"{redact(url)}: HTTP {r.status_code}")
        if r.status_code >= 400:
            r.close()
            raise IOError(f"HTTP {r.status_code}")
        if headers and r.status_code != 206:
            r.close()
            raise _Permanent(f"{redact(url)}: server ignored the byte range (HTTP {r.status_code})")
        r.raw.decode_content = True
        return _HttpBody(r)
    return open_at


class _HttpBody:
    def __init__(self, r):
        self._r = r

    def read(self, n: int) -> bytes:
        return self._r.raw.read(n)

    def close(self) -> None:
        self._r.close()


def _s3_client():
    c = getattr(_local, "s3", None)
    if c is None or getattr(_local, "s3pid", None) != os.getpid():
        try:
            import boto3
        except ImportError:
            raise ImportError("s3:// URLs need boto3: pip install 'lumina-wds[s3]'") from None
        # boto3 honours AWS_ENDPOINT_URL, AWS_PROFILE, AWS_REGION and the credentials chain.
        c = boto3.session.Session().client("s3")
        _local.s3, _local.s3pid = c, os.getpid()
    return c


def _s3_split(url: str):
    parts = urlsplit(url)
    return parts.netloc, parts.path.lstrip("/")


def _s3_opener(url: str, opts: IOOptions):
    bucket, key = _s3_split(url)

    def open_at(pos: int, end: Optional[int]):
        kw = {}
        if pos or end is not None:
            kw["Range"] = f"bytes={pos}-" + ("" if end is None else str(end - 1))
        try:
            return _s3_client().get_object(Bucket=bucket, Key=key, **kw)["Body"]
        except Exception as e:  # noqa: BLE001
            code = getattr(e, "response", {}).get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "NoSuchBucket", "AccessDenied", "InvalidRange", "404", "403"):
                raise _Permanent(f"{url}: {code}") from None
            raise
    return open_at


# --- public API ------------------------------------------------------------------------------

def open_range(url: str, start: int = 0, end: Optional[int] = None,
               opts: IOOptions = DEFAULT) -> io.BufferedReader:
    """A buffered binary stream over bytes ``[start, end)`` of ``url`` (``end=None``: to the end)."""
    if url.startswith("pipe:"):
        if not opts.allow_pipe:
            raise ValueError(f"refusing to run shell URL {url[:40]!r}: pipe: URLs are disabled "
                             "(pass allow_pipe / --allow-pipe to enable them)")
        if start or end is not None:
            raise ValueError("pipe: URLs do not support byte ranges")
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 (opt-in)
        return io.BufferedReader(_PipeRaw(proc), buffer_size=opts.chunk_size)
    if url.startswith(("http://", "https://")):
        raw = _Resuming(url, _http_opener(url, opts), start, end, opts)
    elif url.startswith("s3://"):
        raw = _Resuming(url, _s3_opener(url, opts), start, end, opts)
    elif "://" in url and not url.startswith("file://"):
        raise ValueError(f"unsupported URL scheme in {redact(url)!r} (local path, file://, "
                         "http(s)://, s3:// are supported)")
    else:
        path = local_path(url)
        try:
            f = open(path, "rb", buffering=0)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such file") from None
        raw = _Window(f, start, end)
    return io.BufferedReader(raw, buffer_size=opts.chunk_size)


class _PipeRaw(io.RawIOBase):
    def __init__(self, proc):
        self._p = proc

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._p.stdout.readinto(b)

    def close(self) -> None:
        self._p.stdout.close()
        self._p.wait()
        super().close()


def read_range(url: str, start: int, end: int, opts: IOOptions = DEFAULT) -> bytes:
    """Exactly the bytes ``[start, end)``; a short object raises ``IOError``."""
    with open_range(url, start, end, opts) as f:
        data = f.read(end - start)
    if len(data) != end - start:
        raise IOError(f"{redact(url)}: got {len(data)} of {end - start} bytes at {start} "
                      "(object truncated?)")
    return data


def read_bytes(url: str, opts: IOOptions = DEFAULT) -> bytes:
    with open_range(url, 0, None, opts) as f:
        return f.read()


def read_json(url: str, opts: IOOptions = DEFAULT) -> Any:
    try:
        return json.loads(read_bytes(url, opts))
    except ValueError as e:
        raise ValueError(f"{redact(url)}: not valid JSON: {e}") from None


def object_size(url: str, opts: IOOptions = DEFAULT) -> int:
    """Size in bytes of a local file or remote object."""
    if url.startswith(("http://", "https://")):
        r = _http_session().head(url, timeout=opts.timeout, allow_redirects=True)
        if r.status_code >= 400:
            raise IOError(f"{redact(url)}: HTTP {r.status_code}")
        return int(r.headers["Content-Length"])
    if url.startswith("s3://"):
        bucket, key = _s3_split(url)
        return int(_s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
    return os.path.getsize(local_path(url))
