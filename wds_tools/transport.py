"""Transport: byte access to local files, HTTP(S) and S3, with ranges and resumable retries.

The bottom layer of ``wds_tools`` (it imports nothing of the package). Every opener returns a
binary stream over ``[start, end)`` of one object. Remote streams that drop mid-way (reset,
timeout, truncated body, 5xx, 429) are re-opened at the byte where they broke, after a jittered
exponential backoff, so callers see one uninterrupted stream or, when retries run out, an
``IOError`` naming the URL. Errors that retrying cannot fix (404, 403, 416) fail at once; a
missing object raises ``FileNotFoundError`` whatever its scheme.

``pipe:`` URLs are refused unless ``IOOptions(allow_pipe=True)``. URLs are redacted (no user
info, no query string such as a signature) in every message and log line.

Policy lives above this module: :mod:`wds_tools.cache` (whole-shard cache) and
:mod:`wds_tools.io` (the ``open_range`` front that consults the cache, then this module).
"""

from __future__ import annotations

import io
import logging
import os
import posixpath
import random
import re
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple
from urllib.parse import urljoin, urlsplit, urlunsplit

__all__ = [
    "IOOptions",
    "IOStats",
    "ObjectInfo",
    "stats",
    "DEFAULT",
    "open_direct",
    "open_local",
    "check_range",
    "object_info",
    "s3_request",
    "s3_split",
    "join_url",
    "is_remote",
    "redact",
    "scrub",
    "local_path",
    "reset_clients",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IOOptions:
    """How remote reads behave.

    Attributes:
        timeout: read timeout in seconds: a stream that delivers no byte for this long is
            treated as stalled, dropped and resumed.
        connect_timeout: seconds to establish a connection.
        max_retries: failed attempts in a row (without a byte of progress in between) before
            giving up on a stream; progress resets the count.
        backoff, max_backoff: first retry delay in seconds, doubled per failure up to
            ``max_backoff``, each multiplied by a random factor in [0.5, 1.5).
        allow_pipe: let ``pipe:CMD`` URLs run a shell command (off: they are refused).
        chunk_size: buffer size of the returned streams.
        cache_dir: if set, :func:`wds_tools.io.open_range` fetches remote ``.tar`` shards
            whole into this folder and reads them from there (see :mod:`wds_tools.cache`; the
            transport itself never caches).
        cache_max_bytes: size limit of ``cache_dir``; least recently used shards are evicted.
        verify_checksums: readers that honour it (the streaming loader) re-hash every shard
            when they open it and treat a sha256 mismatch with its index as a bad shard.
    """

    timeout: float = 30.0
    connect_timeout: float = 10.0
    max_retries: int = 8
    backoff: float = 0.25
    max_backoff: float = 8.0
    allow_pipe: bool = False
    chunk_size: int = 1 << 20
    cache_dir: Optional[str] = None
    cache_max_bytes: int = 64 << 30
    verify_checksums: bool = False

    def __post_init__(self) -> None:
        if self.timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("IOOptions: timeout and connect_timeout must be > 0 seconds")
        if self.max_retries < 0 or self.backoff < 0 or self.max_backoff < 0:
            raise ValueError("IOOptions: max_retries, backoff and max_backoff must be >= 0")
        if self.chunk_size < 4096:
            raise ValueError("IOOptions: chunk_size must be >= 4096 bytes")
        if self.cache_max_bytes <= 0:
            raise ValueError("IOOptions: cache_max_bytes must be > 0")


DEFAULT = IOOptions()


@dataclass
class IOStats:
    """Per-process counters of remote reads (for logs, benchmarks and tests)."""

    opens: int = 0  # successful (re)opens of a remote stream
    retries: int = 0  # failed attempts that were retried
    bytes: int = 0  # remote payload bytes delivered to readers

    def reset(self) -> None:
        self.opens = self.retries = self.bytes = 0


stats = IOStats()


# --- URLs and redaction ----------------------------------------------------------------------


def redact(url: str) -> str:
    """The URL without user info, query string and fragment (credentials, signatures)."""
    if "://" not in url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return url.split("://", 1)[0] + "://<unparseable URL>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


_SECRET_PATTERNS = [
    (re.compile(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"]*@"), r"\1"),  # user:password@
    (re.compile(r"\?[^\s'\"<>]*=[^\s'\"<>]*"), "?<redacted>"),  # query strings
    (re.compile(r"(?i)(signature|credential|token|secret|password|sig|key)=[^\s&'\"]+"), r"\1=<redacted>"),
    (re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"), "<access-key-id>"),
]


def scrub(text: str) -> str:
    """``text`` with credentials removed: user info, query strings, key=value secrets."""
    for pat, rep in _SECRET_PATTERNS:
        text = pat.sub(rep, text)
    return text


def is_remote(url: str) -> bool:
    return url.startswith(("http://", "https://", "s3://", "pipe:"))


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join_url(base: str, rel: str) -> str:
    """Resolve ``rel`` against the file ``base`` (a manifest or index) that names it."""
    if "://" in rel or rel.startswith("pipe:"):
        return rel
    if base.startswith(("http://", "https://")):
        return urljoin(base, rel)
    if base.startswith("s3://"):
        bucket, key = s3_split(base)
        if rel.startswith("/"):
            return f"s3://{bucket}{posixpath.normpath(rel)}"
        joined = posixpath.normpath(posixpath.join(posixpath.dirname(key), rel))
        if joined.startswith(".."):
            raise ValueError(f"{rel!r} points outside the bucket of {redact(base)}")
        return f"s3://{bucket}/{joined}"
    if os.path.isabs(rel):
        return rel
    return os.path.normpath(os.path.join(os.path.dirname(local_path(base)), rel))


def s3_split(url: str) -> Tuple[str, str]:
    """(bucket, key) of an ``s3://BUCKET/KEY`` URL."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"{redact(url)}: an s3 URL needs a bucket (s3://BUCKET/KEY)")
    return parts.netloc, parts.path.lstrip("/")


# --- errors and retries ----------------------------------------------------------------------


class _Permanent(IOError):
    """An error that retrying cannot fix (403, a bad range)."""


class _NotFound(_Permanent, FileNotFoundError):
    """404 / NoSuchKey: also a FileNotFoundError, like a missing local file."""


class _Retryable(IOError):
    """A transient error (5xx, 429); ``retry_after`` is the server's hint in seconds."""

    def __init__(self, msg: str, retry_after: Optional[float] = None):
        super().__init__(msg)
        self.retry_after = retry_after


_BOTO_RETRIES = re.compile(r" \(reached max retries: \d+\)")


def _short(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # botocore's own retry count (always 0: retries are ours) would contradict ours
    msg = _BOTO_RETRIES.sub("", msg)
    return scrub(f"{type(e).__name__}: {msg}" if not isinstance(e, (_Retryable, _Permanent)) else msg)[:300]


def _sleep_before_retry(
    url: str, attempt: int, pos: Optional[int], e: BaseException, opts: IOOptions
) -> None:
    delay = min(opts.backoff * (2 ** (attempt - 1)), opts.max_backoff)
    delay *= 0.5 + random.random()
    hint = getattr(e, "retry_after", None)
    if hint:
        delay = max(delay, min(hint, opts.max_backoff))
    at = "" if pos is None else f" at byte {pos}"
    log.warning(
        "%s: %s; retry %d/%d%s in %.2fs", redact(url), _short(e), attempt, opts.max_retries, at, delay
    )
    time.sleep(delay)


def _call_with_retries(url: str, fn: Callable[[], Any], opts: IOOptions) -> Any:
    """``fn()`` retried on transient errors (for one-shot requests such as HEAD)."""
    attempt = 0
    while True:
        try:
            return fn()
        except _Permanent:
            raise
        except Exception as e:  # noqa: BLE001 - network errors come in many types
            attempt += 1
            stats.retries += 1
            if attempt > opts.max_retries:
                raise IOError(
                    f"{redact(url)}: giving up after {opts.max_retries} retries: {_short(e)}"
                ) from None
            _sleep_before_retry(url, attempt, None, e, opts)


# --- local ---------------------------------------------------------------------------------


class _Window(io.RawIOBase):
    """A byte window ``[start, end)`` of an underlying seekable file."""

    def __init__(self, f, start: int, end: Optional[int]):
        self._f, self._left = f, None if end is None else max(0, end - start)
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

_MAX_READ = 1 << 20


class _Resuming(io.RawIOBase):
    """Stream ``[start, end)`` through ``opener(pos, end)``; re-open at ``pos`` on failure.

    The opener returns a body with ``read(n)`` and ``close()``. A body that ends before
    ``end`` counts as a failure (the stream is resumed), so truncation is never silent.
    """

    def __init__(self, url: str, opener, start: int, end: Optional[int], opts: IOOptions):
        self.url, self._opener, self._pos, self._end, self._opts = url, opener, start, end, opts
        self._body = None
        self._eof = False
        self._failures = 0  # consecutive failed attempts, reset by progress
        self.retries = 0  # all retried failures of this stream

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        # bounded reads: bytes received before a failure count as progress, so a stream that
        # keeps breaking still moves forward
        want = min(len(b), _MAX_READ)
        if self._end is not None:
            want = min(want, self._end - self._pos)
        if want <= 0 or self._eof:
            return 0
        while True:
            try:
                body = self._body
                if body is None:
                    body = self._body = self._opener(self._pos, self._end)
                    stats.opens += 1
                data = body.read(want)
                if not data and self._end is not None:
                    raise IOError(
                        f"connection closed at byte {self._pos}, expected {self._end - self._pos} more"
                    )
                break
            except _Permanent:
                self._drop()
                raise
            except Exception as e:  # noqa: BLE001 - network errors come in many types
                self._drop()
                self._failures += 1
                self.retries += 1
                stats.retries += 1
                if self._failures > self._opts.max_retries:
                    raise IOError(
                        f"{redact(self.url)}: giving up after {self._opts.max_retries} "
                        f"retries at byte {self._pos}: {_short(e)}"
                    ) from None
                _sleep_before_retry(self.url, self._failures, self._pos, e, self._opts)
        n = len(data)
        if n == 0:  # the end of an unbounded stream (bodies check their Content-Length)
            self._eof = True
            self._drop()
            return 0
        b[:n] = data
        self._pos += n
        self._failures = 0
        stats.bytes += n
        return n

    def _drop(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            try:
                body.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass

    def close(self) -> None:
        self._drop()
        super().close()


_local = threading.local()
_lock = threading.Lock()


def _http_session():
    """One ``requests.Session`` per thread and process (re-created after fork)."""
    s = getattr(_local, "http", None)
    if s is None or getattr(_local, "http_pid", None) != os.getpid():
        import requests

        s = requests.Session()
        _local.http, _local.http_pid = s, os.getpid()
    return s


def _retry_after(r) -> Optional[float]:
    try:
        return float(r.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _http_status_error(url: str, r) -> IOError:
    st = r.status_code
    if st in (404, 410):
        return _NotFound(f"{redact(url)}: not found (HTTP {st})")
    if st in (401, 403):
        return _Permanent(f"{redact(url)}: access denied (HTTP {st})")
    if st == 416:
        return _Permanent(
            f"{redact(url)}: range not satisfiable (HTTP 416): the object is shorter than its index says"
        )
    if st in (408, 429) or st >= 500:
        return _Retryable(f"HTTP {st}", _retry_after(r))
    return _Permanent(f"{redact(url)}: HTTP {st}")


_ignored_range_warned: set = set()


def _http_opener(url: str, opts: IOOptions):
    def open_at(pos: int, end: Optional[int]):
        # identity encoding: byte offsets must be offsets of the stored object
        headers = {"Accept-Encoding": "identity"}
        ranged = pos > 0 or end is not None
        if ranged:
            headers["Range"] = f"bytes={pos}-" + ("" if end is None else str(end - 1))
        r = _http_session().get(
            url, headers=headers, stream=True, timeout=(opts.connect_timeout, opts.timeout)
        )
        if r.status_code not in (200, 206):
            err = _http_status_error(url, r)
            r.close()
            raise err
        body = _HttpBody(r)
        if r.status_code == 206:
            m = re.match(r"bytes (\d+)-", r.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != pos:
                body.close()
                raise _Permanent(
                    f"{redact(url)}: server answered a range request for byte "
                    f"{pos} with Content-Range {r.headers.get('Content-Range')!r}"
                )
        elif ranged and pos:
            # the server ignored Range (HTTP 200, whole object): skip to ``pos``
            if url not in _ignored_range_warned:
                _ignored_range_warned.add(url)
                log.warning("%s: server ignores byte ranges; reading from the start", redact(url))
            body.skip(pos)
        return body

    return open_at


class _HttpBody:
    def __init__(self, r):
        self._r = r
        r.raw.decode_content = False
        # read1: what has arrived (up to n), so a break loses no received byte
        self.read = getattr(r.raw, "read1", r.raw.read)

    def skip(self, n: int) -> None:
        while n > 0:
            got = self._r.raw.read(min(n, 1 << 20))
            if not got:
                raise IOError(f"connection closed while skipping to byte {n}")
            n -= len(got)

    def close(self) -> None:
        self._r.close()


_s3_clients: dict = {}


def _s3_client(opts: IOOptions):
    """One boto3 S3 client per process and timeout setting (re-created after fork).

    boto3 resolves the standard AWS environment: ``AWS_ENDPOINT_URL`` (or
    ``AWS_ENDPOINT_URL_S3``), ``AWS_PROFILE``, ``AWS_REGION``/``AWS_DEFAULT_REGION``, and the
    credentials chain (environment, shared files, SSO, instance roles). Retries are ours, so
    botocore's own are off.
    """
    key = (os.getpid(), opts.connect_timeout, opts.timeout)
    c = _s3_clients.get(key)
    if c is None:
        with _lock:
            c = _s3_clients.get(key)
            if c is None:
                try:
                    import boto3
                    from botocore.config import Config
                except ImportError:
                    raise ImportError("s3:// URLs need boto3: pip install 'lumina-wds[s3]'") from None
                cfg = Config(
                    connect_timeout=opts.connect_timeout,
                    read_timeout=opts.timeout,
                    retries={"total_max_attempts": 1},
                    max_pool_connections=32,
                )
                c = boto3.session.Session().client("s3", config=cfg)
                for k in [k for k in _s3_clients if k[0] != os.getpid()]:
                    del _s3_clients[k]  # clients inherited from a parent process
                _s3_clients[key] = c
    return c


_S3_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_S3_PERMANENT = {
    "AccessDenied",
    "403",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidRange",
    "416",
    "InvalidBucketName",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidToken",
    "AuthorizationHeaderMalformed",
}


def _s3_error(url: str, e: Exception) -> Exception:
    resp = getattr(e, "response", None)
    code = str(resp.get("Error", {}).get("Code", "")) if isinstance(resp, dict) else ""
    if code in _S3_NOT_FOUND:
        return _NotFound(f"{redact(url)}: not found ({code})")
    if code in _S3_PERMANENT:
        return _Permanent(f"{redact(url)}: {code}")
    if type(e).__name__ in (
        "NoCredentialsError",
        "PartialCredentialsError",
        "ProfileNotFound",
        "NoRegionError",
        "ParamValidationError",
    ):
        return _Permanent(f"{redact(url)}: {_short(e)}")
    return e


def _s3_opener(url: str, opts: IOOptions):
    bucket, key = s3_split(url)

    def open_at(pos: int, end: Optional[int]):
        kw = {}
        if pos or end is not None:
            kw["Range"] = f"bytes={pos}-" + ("" if end is None else str(end - 1))
        try:
            return _S3Body(_s3_client(opts).get_object(Bucket=bucket, Key=key, **kw))
        except Exception as e:  # noqa: BLE001 - botocore raises many types
            raise _s3_error(url, e) from None

    return open_at


class _S3Body:
    """A get_object answer read as it arrives.

    botocore's ``StreamingBody.read(n)`` fills all ``n`` bytes before returning; the urllib3
    response under it has ``read1`` (what has arrived, up to n), which is ~15% faster here and
    loses no received byte when the connection breaks. Reading below botocore skips its length
    check, so the body counts bytes against ``ContentLength`` itself: an answer that ends early
    raises (and is resumed) instead of passing as a short object.
    """

    def __init__(self, resp: dict):
        self._b = resp["Body"]
        self._left = resp.get("ContentLength")
        raw = getattr(self._b, "_raw_stream", None)
        self._read1 = getattr(raw, "read1", None)

    def read(self, n: int) -> bytes:
        if self._read1 is None:  # urllib3 1.x: botocore's read, in bounded pieces
            return self._b.read(min(n, 256 << 10))
        data = self._read1(min(n, _MAX_READ))
        if self._left is not None:
            if not data and self._left > 0:
                raise IOError(f"connection closed with {self._left} bytes of the answer unread")
            self._left -= len(data)
        return data

    def close(self) -> None:
        self._b.close()


# --- public API ------------------------------------------------------------------------------


def check_range(url: str, start: int, end: Optional[int]) -> None:
    """Refuse a byte range ``[start, end)`` that cannot exist (ValueError naming the URL)."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"bad byte range [{start}, {end}) for {redact(url)}")


def open_direct(
    url: str, start: int = 0, end: Optional[int] = None, opts: IOOptions = DEFAULT
) -> io.BufferedReader:
    """A buffered binary stream over bytes ``[start, end)`` of ``url`` (``end=None``: to the end),
    straight from its source (no cache: that is :func:`wds_tools.io.open_range`'s policy).

    Remote streams resume where they broke; see the module docstring. Nothing is requested
    until the first read.
    """
    check_range(url, start, end)
    if url.startswith("pipe:"):
        if not opts.allow_pipe:
            raise ValueError(
                f"refusing to run shell URL {scrub(url[:40])!r}: pipe: URLs are "
                "disabled (pass IOOptions(allow_pipe=True) / --allow-pipe to "
                "enable them)"
            )
        if start or end is not None:
            raise ValueError("pipe: URLs do not support byte ranges")
        proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE)  # noqa: S602 (opt-in)
        return io.BufferedReader(_PipeRaw(proc), buffer_size=opts.chunk_size)
    if url.startswith(("http://", "https://", "s3://")):
        opener = _http_opener if url.startswith("http") else _s3_opener
        raw = _Resuming(url, opener(url, opts), start, end, opts)
        return io.BufferedReader(raw, buffer_size=opts.chunk_size)
    if "://" in url and not url.startswith("file://"):
        raise ValueError(
            f"unsupported URL scheme in {redact(url)!r} (local path, file://, "
            "http(s)://, s3:// are supported)"
        )
    return open_local(local_path(url), start, end, opts)


def open_local(
    path: str, start: int = 0, end: Optional[int] = None, opts: IOOptions = DEFAULT
) -> io.BufferedReader:
    """``[start, end)`` of a local file, buffered like the remote streams."""
    try:
        f = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    return io.BufferedReader(_Window(f, start, end), buffer_size=opts.chunk_size)


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


@dataclass(frozen=True)
class ObjectInfo:
    """What a cache needs to know of an object without reading it.

    ``version`` changes when the object changes: size plus ETag/Last-Modified (remote) or size
    plus mtime (local).
    """

    size: int
    version: str


def _http_probe(url: str, opts: IOOptions) -> ObjectInfo:
    """Size and version from a HEAD answer, or, where the server refuses HEAD (405), from a
    one-byte ranged GET: there the size is the total of ``Content-Range`` (206) or the
    ``Content-Length`` of a server that ignored the range (200), never the 1-byte body."""
    s = _http_session()
    timeout = (opts.connect_timeout, opts.timeout)
    r = s.head(url, timeout=timeout, allow_redirects=True, headers={"Accept-Encoding": "identity"})
    if r.status_code == 405:
        r = s.get(
            url, headers={"Range": "bytes=0-0", "Accept-Encoding": "identity"}, timeout=timeout, stream=True
        )
        r.close()  # the body (one byte, or the whole object if Range was ignored) is not read
    if r.status_code >= 400:
        raise _http_status_error(url, r)
    size: Optional[int] = None
    cr = r.headers.get("Content-Range", "")
    if r.status_code == 206:
        total = cr.rsplit("/", 1)[1] if "/" in cr else ""
        if not total.isdigit():
            raise IOError(
                f"{redact(url)}: the server does not report the object's size (Content-Range {cr!r})"
            )
        size = int(total)
    elif r.headers.get("Content-Length", "").isdigit():
        size = int(r.headers["Content-Length"])
    if size is None:
        raise IOError(f"{redact(url)}: the server does not report a Content-Length")
    return ObjectInfo(size, f"{size}|{r.headers.get('ETag', '')}|{r.headers.get('Last-Modified', '')}")


def s3_request(url: str, method: str, opts: IOOptions = DEFAULT, **kw: Any) -> Any:
    """One S3 client call (``head_object``, ``put_object``, ...) about ``url``, retried on
    transient errors; permanent ones (not found, access denied) raise at once, named by the
    redacted URL."""

    def call():
        try:
            return getattr(_s3_client(opts), method)(**kw)
        except Exception as e:  # noqa: BLE001 - botocore raises many types
            raise _s3_error(url, e) from None

    return _call_with_retries(url, call, opts)


def _s3_head(url: str, opts: IOOptions) -> dict:
    bucket, key = s3_split(url)
    return s3_request(url, "head_object", opts, Bucket=bucket, Key=key)


def object_info(url: str, opts: IOOptions = DEFAULT) -> ObjectInfo:
    """Size and version of a local file or remote object (one HEAD, retried)."""
    if url.startswith(("http://", "https://")):
        return _call_with_retries(url, lambda: _http_probe(url, opts), opts)
    if url.startswith("s3://"):
        h = _s3_head(url, opts)
        size = int(h["ContentLength"])
        return ObjectInfo(size, f"{size}|{h.get('ETag', '')}|{h.get('LastModified', '')}")
    if url.startswith("pipe:"):
        raise ValueError("pipe: URLs have no size")
    try:
        st = os.stat(local_path(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"{local_path(url)}: no such file") from None
    return ObjectInfo(st.st_size, f"{st.st_size}|{st.st_mtime_ns}")


def reset_clients() -> None:
    """Forget the cached S3 clients (they hold the AWS environment they were made in)."""
    with _lock:
        _s3_clients.clear()
