"""wds_tools.io without servers: URLs, redaction, pipe refusal, local ranges, resume logic."""

from __future__ import annotations

import io
import logging
import os

import pytest

from wds_tools import io as wio
from wds_tools import transport

FAST = wio.IOOptions(backoff=0.0, max_backoff=0.0, max_retries=3)
SECRET = "s3cr3tSIGNATURE"


# --- URLs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url,expected",
    [
        (
            "https://user:pw@host.example:8443/a/b.tar?X-Amz-Signature=abc#frag",
            "https://host.example:8443/a/b.tar",
        ),
        ("http://127.0.0.1/ds/index.json", "http://127.0.0.1/ds/index.json"),
        ("s3://bucket/key/x.tar?versionId=3", "s3://bucket/key/x.tar"),
        ("http://[::1]:8080/x", "http://[::1]:8080/x"),
        ("/local/path/x.tar", "/local/path/x.tar"),
    ],
)
def test_redact(url, expected):
    assert wio.redact(url) == expected


def test_scrub_removes_credentials_from_free_text():
    text = (
        f"HTTPConnectionPool(host='h', port=1): Max retries exceeded with url: "
        f"/ds/x.tar?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP&X-Amz-Signature={SECRET} "
        f"(https://bob:{SECRET}@h/x) token={SECRET} key AKIAABCDEFGHIJKLMNOP"
    )
    out = wio.scrub(text)
    assert SECRET not in out and "AKIAABCDEFGHIJKLMNOP" not in out and "bob" not in out
    assert "/ds/x.tar" in out
    assert wio.scrub("object truncated?") == "object truncated?"


@pytest.mark.parametrize(
    "base,rel,expected",
    [
        ("/data/ds/index.json", "shard-0.tar", "/data/ds/shard-0.tar"),
        ("/data/ds/index.json", "../other/s.tar", "/data/other/s.tar"),
        ("file:///data/ds/index.json", "s.tar", "/data/ds/s.tar"),
        ("http://h:1/a/ds/index.json", "s.tar", "http://h:1/a/ds/s.tar"),
        ("http://h:1/a/ds/index.json", "../b/s.tar", "http://h:1/a/b/s.tar"),
        ("s3://bkt/a/ds/index.json", "s.tar", "s3://bkt/a/ds/s.tar"),
        ("s3://bkt/a/ds/index.json", "../b/s.tar", "s3://bkt/a/b/s.tar"),
        ("s3://bkt/index.json", "s.tar", "s3://bkt/s.tar"),
        ("/data/index.json", "s3://other/s.tar", "s3://other/s.tar"),
    ],
)
def test_join_url(base, rel, expected):
    assert wio.join_url(base, rel) == expected


def test_join_url_refuses_to_leave_the_bucket():
    with pytest.raises(ValueError, match="outside the bucket"):
        wio.join_url("s3://bkt/ds/index.json", "../../x.tar")


# --- pipe: and schemes ------------------------------------------------------------------------


def test_pipe_refused_by_default(tmp_path):
    marker = tmp_path / "ran"
    with pytest.raises(ValueError, match="allow_pipe"):
        wio.open_range(f"pipe:touch {marker}")
    assert not marker.exists()


def test_pipe_allowed_explicitly():
    with wio.open_range("pipe:printf abc", opts=wio.IOOptions(allow_pipe=True)) as f:
        assert f.read() == b"abc"
    with pytest.raises(ValueError, match="byte ranges"):
        wio.open_range("pipe:printf abc", 1, 2, opts=wio.IOOptions(allow_pipe=True))


def test_unknown_scheme_and_bad_ranges():
    with pytest.raises(ValueError, match="unsupported URL scheme"):
        wio.open_range("ftp://u:pw@h/x.tar")
    with pytest.raises(ValueError, match="bad byte range"):
        wio.open_range("/x", 5, 2)


def test_options_validated():
    with pytest.raises(ValueError, match="timeout"):
        wio.IOOptions(timeout=0)
    with pytest.raises(ValueError, match="max_retries"):
        wio.IOOptions(max_retries=-1)


# --- local ------------------------------------------------------------------------------------


def test_local_ranges(tmp_path):
    p = tmp_path / "obj"
    data = bytes(range(256)) * 40
    p.write_bytes(data)
    assert wio.read_range(str(p), 10, 300) == data[10:300]
    assert wio.read_bytes("file://" + str(p)) == data
    with wio.open_range(str(p), 100) as f:
        assert f.read() == data[100:]
    assert wio.object_size(str(p)) == len(data)
    with pytest.raises(IOError, match="truncated"):
        wio.read_range(str(p), len(data) - 5, len(data) + 5)
    with pytest.raises(FileNotFoundError):
        wio.read_bytes(str(tmp_path / "missing"))
    (tmp_path / "j.json").write_text("{bad")
    with pytest.raises(ValueError, match="not valid JSON"):
        wio.read_json(str(tmp_path / "j.json"))


# --- resume logic with a scripted opener --------------------------------------------------------


class _Body:
    def __init__(self, data: bytes, fail_after: int = -1, exc: Exception = None):
        self._f, self._left, self._exc = io.BytesIO(data), fail_after, exc

    def read(self, n: int) -> bytes:
        if self._left == 0:
            raise self._exc or ConnectionResetError("reset by peer")
        if self._left > 0:
            n = min(n, self._left)
            self._left -= n
        return self._f.read(n)

    def close(self) -> None:
        pass


def _scripted(data: bytes, plan):
    """An opener whose successive opens follow ``plan``: an int = fail after that many bytes,
    None = healthy, an exception = raise it on open. Records the positions opened at."""
    opened = []

    def open_at(pos, end):
        opened.append(pos)
        step = plan.pop(0) if plan else None
        if isinstance(step, BaseException):
            raise step
        return _Body(data[pos:end], -1 if step is None else step)

    return open_at, opened


def test_resume_at_the_byte_where_it_broke():
    data = os.urandom(10_000)
    opener, opened = _scripted(data, [1000, 2500, ConnectionError("refused"), 10, None])
    raw = transport._Resuming("http://h/x.tar", opener, 100, 9_000, FAST)
    with io.BufferedReader(raw, buffer_size=4096) as f:
        assert f.read() == data[100:9_000]
    assert opened == [100, 1100, 3600, 3600, 3610]
    assert raw.retries == 4


def test_truncated_body_is_resumed_not_silent():
    data = os.urandom(5000)

    def open_at(pos, end):  # each body ends early, without an error
        return _Body(data[pos : min(end, pos + 1500)])

    with io.BufferedReader(transport._Resuming("http://h/x", open_at, 0, 5000, FAST)) as f:
        assert f.read() == data


def test_gives_up_after_max_retries_without_leaking_secrets(caplog):
    url = f"https://user:{SECRET}@h/x.tar?X-Amz-Signature={SECRET}"
    err = ConnectionError(f"Max retries exceeded with url: /x.tar?X-Amz-Signature={SECRET}")

    def open_at(pos, end):
        raise err

    caplog.set_level(logging.DEBUG, logger="wds_tools")
    with pytest.raises(IOError, match="giving up after 3 retries") as ei:
        io.BufferedReader(transport._Resuming(url, open_at, 0, 10, FAST)).read()
    assert SECRET not in str(ei.value) and SECRET not in caplog.text
    assert "https://h/x.tar" in str(ei.value)
    assert ei.value.__suppress_context__  # the raw error (with the secret) is not chained


def test_permanent_errors_are_not_retried():
    calls = []

    def open_at(pos, end):
        calls.append(pos)
        raise transport._NotFound("http://h/x: not found (HTTP 404)")

    with pytest.raises(FileNotFoundError, match="404"):
        io.BufferedReader(transport._Resuming("http://h/x", open_at, 0, 10, FAST)).read()
    assert calls == [0]


def test_progress_resets_the_failure_count():
    data = os.urandom(50_000)
    # fails 10 times in all (more than max_retries=3) but never twice without progress
    opener, _ = _scripted(data, [3000] * 10)
    with io.BufferedReader(transport._Resuming("http://h/x", opener, 0, 50_000, FAST)) as f:
        assert f.read() == data


def test_empty_range_opens_nothing():
    def open_at(pos, end):
        raise AssertionError("opened")

    with io.BufferedReader(transport._Resuming("http://h/x", open_at, 7, 7, FAST)) as f:
        assert f.read() == b""
