"""Remote sources against real servers on 127.0.0.1: nginx (HTTP ranges), moto (S3), a fault
proxy that cuts or stalls connections, a scripted server for status codes; plus the shard cache.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import time

import numpy as np
import pytest

from wds_tools import io as wio
from wds_tools.cache import ShardCache
from wds_tools.reader import Shard, iter_samples, load_manifest

from servers import BUCKET, FaultProxy, ScriptedHTTPServer

pytestmark = pytest.mark.network

FAST = wio.IOOptions(timeout=2.0, connect_timeout=2.0, backoff=0.01, max_backoff=0.05)


def _seq(source, opts=FAST):
    return [
        (s["__key__"], s["input_ids"].tobytes(), s["labels"].tobytes(), s["meta"])
        for s in iter_samples(source, opts=opts)
    ]


@pytest.fixture(scope="module")
def disk_seq(remote_dataset):
    seq = _seq(os.path.join(remote_dataset, "ds", "index.json"))
    assert len(seq) == 300
    return seq


# --- same samples from disk, HTTP and S3 -------------------------------------------------------


def test_http_and_s3_equal_disk(remote_dataset, nginx, s3_env, disk_seq):
    assert _seq(f"{nginx.url}/ds/index.json") == disk_seq
    assert _seq(f"s3://{BUCKET}/ds/index.json") == disk_seq


def test_random_access_by_range(remote_dataset, nginx, s3_env):
    m = load_manifest(os.path.join(remote_dataset, "ds", "index.json"))
    rel = m["shards"][1]["path"]
    local = Shard.open(os.path.join(remote_dataset, "ds", rel))
    for url in (f"{nginx.url}/ds/{rel}", f"s3://{BUCKET}/ds/{rel}"):
        sh = Shard.open(url, opts=FAST)
        for i in (0, 57, len(sh) - 1):
            a, b = sh.read(i), local.read(i)
            assert a["__key__"] == b["__key__"] and np.array_equal(a["input_ids"], b["input_ids"])
        assert [s["__key__"] for s in sh.iter(10, 20)] == [s["__key__"] for s in local.iter(10, 20)]
        assert wio.object_size(url, FAST) == os.path.getsize(local.url)


def test_aws_profile_is_honoured(s3, tmp_path, monkeypatch, disk_seq):
    """Endpoint, region and keys from a named profile in the shared config files."""
    for k in (
        "AWS_ENDPOINT_URL",
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_DEFAULT_REGION",
        "AWS_REGION",
    ):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / "config").write_text(f"[profile moto]\nregion = us-east-1\nendpoint_url = {s3.endpoint}\n")
    (tmp_path / "credentials").write_text("[moto]\naws_access_key_id = a\naws_secret_access_key = b\n")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_PROFILE", "moto")
    wio.reset_clients()
    try:
        assert _seq(f"s3://{BUCKET}/ds/index.json") == disk_seq
    finally:
        wio.reset_clients()


# --- faults ------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["http", "s3"])
def test_cut_connections_resume_exactly(backend, nginx, s3_env, monkeypatch, disk_seq, caplog):
    """A proxy resets 6 connections mid-shard; the samples equal the fault-free run."""
    port = nginx.port if backend == "http" else s3_env.port
    with FaultProxy(port, after_bytes=60_000, faults=6) as proxy:
        if backend == "http":
            source = f"{proxy.url}/ds/index.json"
        else:
            monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
            wio.reset_clients()
            source = f"s3://{BUCKET}/ds/index.json"
        before = wio.stats.retries
        with caplog.at_level(logging.WARNING, logger="wds_tools.transport"):
            assert _seq(source) == disk_seq
        assert proxy.faults_done == 6
        assert wio.stats.retries - before >= 6
    # both resume at the exact byte where the break came (read1): never from 0 again
    resumed = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert resumed and all(" at byte 0 " not in m for m in resumed), resumed
    wio.reset_clients()


def test_stalled_connection_times_out_and_resumes(nginx, disk_seq):
    with FaultProxy(nginx.port, after_bytes=100_000, faults=1, mode="stall") as proxy:
        opts = wio.IOOptions(timeout=0.5, backoff=0.01)
        t = time.monotonic()
        assert _seq(f"{proxy.url}/ds/index.json", opts) == disk_seq
        assert proxy.faults_done == 1 and time.monotonic() - t < 10


def test_gives_up_with_a_clear_error_when_the_server_is_gone(nginx):
    with FaultProxy(nginx.port) as proxy:
        url = f"{proxy.url}/ds/index.json"
    opts = wio.IOOptions(timeout=0.5, connect_timeout=0.5, backoff=0.01, max_retries=2)
    with pytest.raises(IOError, match=r"giving up after 2 retries"):
        wio.read_json(url, opts)


# --- status codes ------------------------------------------------------------------------------


def test_5xx_and_429_are_retried(remote_dataset, disk_seq):
    with ScriptedHTTPServer(remote_dataset, errors=[503, 429, 500, 502]) as srv:
        assert _seq(f"{srv.url}/ds/index.json") == disk_seq
        assert [r[0] for r in srv.requests[:5]] == ["GET"] * 5


def test_server_without_range_support(remote_dataset, disk_seq):
    """200 with the whole object in answer to a Range request: skipped up to the range."""
    with ScriptedHTTPServer(remote_dataset, honour_ranges=False) as srv:
        assert _seq(f"{srv.url}/ds/index.json") == disk_seq
        m = load_manifest(os.path.join(remote_dataset, "ds", "index.json"))
        sh = Shard.open(f"{srv.url}/ds/{m['shards'][2]['path']}", opts=FAST)
        assert sh.read(99)["__key__"] == "s0000299"


def test_404_and_416_fail_at_once(nginx):
    before = wio.stats.retries
    t = time.monotonic()
    with pytest.raises(FileNotFoundError, match="404"):
        wio.read_json(f"{nginx.url}/ds/missing.json", wio.IOOptions(backoff=5))
    with pytest.raises(IOError, match="416"):
        wio.read_range(f"{nginx.url}/ds/index.json", 10**9, 10**9 + 10, wio.IOOptions(backoff=5))
    assert time.monotonic() - t < 2 and wio.stats.retries == before


def test_s3_missing_key_is_file_not_found(s3_env):
    with pytest.raises(FileNotFoundError, match="NoSuchKey|not found"):
        wio.read_bytes(f"s3://{BUCKET}/ds/missing.json", FAST)


def test_no_credentials_in_errors_or_logs(nginx, s3_env, monkeypatch, caplog):
    secret = "SIGxyzSECRET123"
    caplog.set_level(logging.DEBUG)
    url = f"http://alice:{secret}@127.0.0.1:{nginx.port}/ds/missing.tar?X-Amz-Signature={secret}"
    with pytest.raises(FileNotFoundError) as e1:
        wio.read_bytes(url, FAST)
    with FaultProxy(nginx.port) as proxy:  # a closed port: retries, then give up
        dead = f"{proxy.url}/ds/x.tar?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP&X-Amz-Signature={secret}"
    with pytest.raises(IOError) as e2:
        wio.read_range(dead, 0, 10, wio.IOOptions(connect_timeout=0.5, backoff=0.01, max_retries=1))
    # S3: the environment's secret key never shows, whatever fails
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead.split("/ds/")[0])
    wio.reset_clients()
    with pytest.raises(IOError) as e3:
        wio.read_bytes(
            f"s3://{BUCKET}/ds/index.json", wio.IOOptions(connect_timeout=0.5, backoff=0.01, max_retries=1)
        )
    wio.reset_clients()
    # ours at every level, anyone's at WARNING and above (urllib3's and botocore's DEBUG
    # lines print request URLs; that is their business and off by default)
    logged = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("wds_tools") or r.levelno >= logging.WARNING
    )
    assert "retry" in logged
    for text in (str(e1.value), str(e2.value), str(e3.value), logged):
        assert secret not in text and "AKIAABCDEFGHIJKLMNOP" not in text
        assert os.environ["AWS_SECRET_ACCESS_KEY"] not in text and "alice" not in text


# --- cache -------------------------------------------------------------------------------------


def test_cache_keys_do_not_collide_and_respect_the_limit(remote_dataset, nginx, tmp_path):
    """ds/ and ds2/ have equal shard names: both cached, each read back right; then a small
    limit evicts the least recently used shards."""
    opts = wio.IOOptions(cache_dir=str(tmp_path / "c"), timeout=5)
    expected = {n: _seq(os.path.join(remote_dataset, n, "index.json")) for n in ("ds", "ds2")}
    for _ in range(2):
        for n in ("ds", "ds2"):
            assert _seq(f"{nginx.url}/{n}/index.json", opts) == expected[n]
    cache = ShardCache.for_options(opts)
    assert cache.misses == 6 and cache.hits >= 6
    names = [f for f in os.listdir(tmp_path / "c") if f.endswith(".tar")]
    assert len(names) == 6 and len({n.split("-", 1)[1] for n in names}) == 3

    shard_bytes = os.path.getsize(os.path.join(remote_dataset, "ds", "shard-r00000-000000.tar"))
    small = wio.IOOptions(cache_dir=str(tmp_path / "s"), cache_max_bytes=int(shard_bytes * 2.5))
    assert _seq(f"{nginx.url}/ds/index.json", small) == expected["ds"]
    c = ShardCache.for_options(small)
    assert c.evictions == 1 and c.cached_bytes() <= small.cache_max_bytes
    tiny = wio.IOOptions(cache_dir=str(tmp_path / "t"), cache_max_bytes=1000)
    assert _seq(f"{nginx.url}/ds/index.json", tiny) == expected["ds"]  # streamed, not cached
    assert not [f for f in os.listdir(tmp_path / "t") if f.endswith(".tar")]


def _read_through_cache(args):
    url, cache_dir = args
    opts = wio.IOOptions(cache_dir=cache_dir, timeout=5)
    return [s["__key__"] for s in iter_samples(url, opts=opts)]


def test_cache_shared_by_processes(remote_dataset, nginx, tmp_path):
    url = f"{nginx.url}/ds/index.json"
    with mp.get_context("fork").Pool(3) as pool:
        outs = pool.map(_read_through_cache, [(url, str(tmp_path))] * 3)
    assert outs[0] == outs[1] == outs[2] and len(outs[0]) == 300
    files = os.listdir(tmp_path)
    assert len([f for f in files if f.endswith(".tar")]) == 3
    assert not [f for f in files if f.endswith(".part")]


def test_cache_refetches_a_changed_object(tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "a.tar").write_bytes(b"x" * 1000)
    opts = wio.IOOptions(cache_dir=str(tmp_path / "c"))
    with ScriptedHTTPServer(str(www)) as srv:
        assert wio.read_range(f"{srv.url}/a.tar", 0, 4, opts) == b"xxxx"
        time.sleep(0.01)
        (www / "a.tar").write_bytes(b"y" * 1000)
        ShardCache.for_options(opts)._versions.clear()  # skip the 60 s version memo
        assert wio.read_range(f"{srv.url}/a.tar", 0, 4, opts) == b"yyyy"


@pytest.mark.parametrize("honour_ranges", [True, False])
def test_server_refusing_head_works_with_the_cache(remote_dataset, disk_seq, tmp_path, honour_ranges):
    """HEAD answered with 405: size and version come from a one-byte ranged GET (the total of
    Content-Range, or the Content-Length of a server that ignores ranges), so the cache stores
    whole shards, not the one-byte answer."""
    opts = wio.IOOptions(cache_dir=str(tmp_path / "c"), timeout=5, backoff=0.01)
    with ScriptedHTTPServer(remote_dataset, allow_head=False, honour_ranges=honour_ranges) as srv:
        url = f"{srv.url}/ds/shard-r00000-000000.tar"
        size = os.path.getsize(os.path.join(remote_dataset, "ds", "shard-r00000-000000.tar"))
        assert wio.object_size(url, opts) == size
        assert wio.object_version(url, opts).startswith(f"{size}|")
        for _ in range(2):  # the second pass reads the cached copies
            assert _seq(f"{srv.url}/ds/index.json", opts) == disk_seq
        assert ("HEAD", "/ds/shard-r00000-000000.tar", None) in srv.requests
    cached = [f for f in os.listdir(tmp_path / "c") if f.endswith(".tar")]
    assert len(cached) == 3
    shards = [f for f in os.listdir(os.path.join(remote_dataset, "ds")) if f.endswith(".tar")]
    assert sorted(os.path.getsize(tmp_path / "c" / f) for f in cached) == sorted(
        os.path.getsize(os.path.join(remote_dataset, "ds", f)) for f in shards
    )
