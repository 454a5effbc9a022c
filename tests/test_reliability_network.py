"""Reliability under network faults: the loader's sample stream (keys + tokens) through
connection resets, truncated bodies, stalls, slow trickles, HTTP 5xx, S3 throttling (503
SlowDown / 500 InternalError from a front in front of moto), a shard that vanishes between
listing and reading, and servers that never recover.

Each case is compared against the fault-free run from disk: lost and duplicated samples are
counted (multiset difference) and the order must be equal; the faults counted are those the
proxy or server actually injected. Figures go to ``reliability_log.record`` (category
"network").
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter

import numpy as np
import pytest

from wds_tools import io as wio

from reliability_log import record
from servers import BUCKET, FaultProxy, S3FaultProxy, ScriptedHTTPServer, two_dataset_config

torch = pytest.importorskip("torch")
loader_mod = pytest.importorskip("wds_tools.loader")

pytestmark = [pytest.mark.reliability, pytest.mark.network]

FAST = wio.IOOptions(timeout=2.0, connect_timeout=2.0, backoff=0.01, max_backoff=0.05)


def _config(tmp_path, name: str, base: str, on_error: str = "fail") -> str:
    return two_dataset_config(tmp_path, name, base, seed=11, weights=(0.6, 0.4), on_error=on_error)


def _samples(cfg_path, opts=FAST):
    """The loader's mixed sample stream of one consumer: (key, token bytes)."""
    return [
        (s["__key__"], s["input_ids"].astype(np.int64).tobytes())
        for s in loader_mod.iter_mixed(cfg_path, io_options=opts)
    ]


def _batch(b):
    lens = b["attention_mask"].sum(1).tolist()
    return [(k, row[:n].numpy().tobytes()) for k, row, n in zip(b["__key__"], b["input_ids"], lens)]


def _batch_samples(loader):
    """(key, tokens) of every sample of every batch a loader delivers."""
    return [x for b in loader for x in _batch(b)]


def _build(cfg, workers=0, opts=FAST, max_seq_len=1 << 16):
    return loader_mod.build_loader(
        cfg,
        rank=0,
        world_size=1,
        batch_size=8,
        num_workers=workers,
        max_seq_len=max_seq_len,
        pad_id=0,
        io_options=opts,
    )


def _diff(clean, got):
    """(lost, duplicated) samples of ``got`` against ``clean`` (multisets)."""
    c, g = Counter(clean), Counter(got)
    return sum((c - g).values()), sum((g - c).values())


@pytest.fixture(scope="module")
def clean(remote_dataset, tmp_path_factory):
    seq = _samples(_config(tmp_path_factory.mktemp("cfg"), "disk", remote_dataset))
    assert len(seq) == 600 and len(set(seq)) == 600
    return seq


@pytest.fixture(scope="module")
def clean_batches(remote_dataset, tmp_path_factory):
    """The clean run through the batching loader, in process and with 2 workers."""
    cfg = _config(tmp_path_factory.mktemp("cfgb"), "disk", remote_dataset)
    out = {w: _batch_samples(_build(cfg, w)) for w in (0, 2)}
    # 2 workers: the documented tail (< batch_size per group per reader) is dropped
    assert len(out[0]) == 600 and all(len(set(v)) == len(v) > 580 for v in out.values())
    return out


def _s3_through(monkeypatch, url: str) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", url)
    wio.reset_clients()


# --- broken, stalled, slow connections ---------------------------------------------------------


@pytest.mark.parametrize("backend", ["http", "s3"])
@pytest.mark.parametrize("mode", ["cut", "close", "stall"])
def test_broken_connections_lose_nothing(mode, backend, nginx, s3_env, monkeypatch, tmp_path, clean):
    """RST mid-body, an orderly close mid-body (truncated response) and a stall past the read
    timeout: each stream resumes at the byte where it broke; the samples equal the clean run."""
    port = nginx.port if backend == "http" else s3_env.port
    faults = 2 if mode == "stall" else 6
    opts = wio.IOOptions(timeout=0.5, connect_timeout=2.0, backoff=0.01, max_backoff=0.05)
    with FaultProxy(port, after_bytes=30_000, faults=faults, mode=mode) as proxy:
        if backend == "http":
            cfg = _config(tmp_path, "p", proxy.url)
        else:
            _s3_through(monkeypatch, proxy.url)
            cfg = _config(tmp_path, "p", f"s3://{BUCKET}")
        before = wio.stats.retries
        t = time.monotonic()
        got = _samples(cfg, opts)
        elapsed = time.monotonic() - t
        injected = proxy.faults_done
    retries = wio.stats.retries - before
    lost, dup = _diff(clean, got)
    case = {"cut": "reset", "close": "truncated body", "stall": "stall"}[mode]
    record(
        "network",
        f"{case} ({backend})",
        injected=injected,
        tried=len(clean),
        lost=lost,
        duplicated=dup,
        detected=retries,
        note=f"retried {retries}x; {elapsed:.1f}s" + (" (read timeout 0.5 s)" if mode == "stall" else ""),
    )
    assert injected == faults
    assert got == clean and lost == dup == 0
    assert retries >= injected
    wio.reset_clients()


def test_slow_trickle_is_not_a_stall(nginx, tmp_path, clean):
    """A link that delivers 4 KiB every 20 ms never goes silent for the read timeout: no retry,
    nothing lost, just slower."""
    opts = wio.IOOptions(timeout=0.5, connect_timeout=2.0, backoff=0.01, max_backoff=0.05)
    with FaultProxy(
        nginx.port, after_bytes=20_000, faults=4, mode="trickle", trickle_bytes=4096, trickle_delay=0.02
    ) as proxy:
        before = wio.stats.retries
        t = time.monotonic()
        got = _samples(_config(tmp_path, "t", proxy.url), opts)
        elapsed = time.monotonic() - t
        injected = proxy.faults_done
    retries = wio.stats.retries - before
    lost, dup = _diff(clean, got)
    record(
        "network",
        "trickle (http)",
        injected=injected,
        tried=len(clean),
        lost=lost,
        duplicated=dup,
        detected=retries,
        note=f"32 KiB at 4 KiB / 20 ms, {injected} times, read timeout 0.5 s; {retries} "
        f"retries; {elapsed:.1f}s",
    )
    assert injected == 4 and got == clean and retries == 0


# --- status codes -------------------------------------------------------------------------------


def test_http_5xx_every_few_requests(remote_dataset, tmp_path, clean):
    """Every 3rd request (GET or HEAD) answered 500/503/502/504: streamed, and through the
    shard cache (HEAD for the version, whole-shard download)."""
    cached = wio.IOOptions(
        timeout=2.0, connect_timeout=2.0, backoff=0.01, max_backoff=0.05, cache_dir=str(tmp_path / "cache")
    )
    with ScriptedHTTPServer(remote_dataset, fail_every=3, fail_codes=(500, 503, 502, 504)) as srv:
        before = wio.stats.retries
        got = _samples(_config(tmp_path, "h", srv.url))
        got_c = _samples(_config(tmp_path, "h", srv.url), cached)
        injected, total = srv.errors_sent, len(srv.requests)
        heads = sum(1 for r in srv.requests if r[0] == "HEAD")
    lost, dup = _diff(clean + clean, got + got_c)
    record(
        "network",
        "http 5xx",
        injected=injected,
        tried=2 * len(clean),
        lost=lost,
        duplicated=dup,
        detected=wio.stats.retries - before,
        note=f"every 3rd of {total} requests ({heads} HEAD) answered 500/503/502/504; "
        "streamed and through the shard cache",
    )
    assert injected >= 5 and heads >= 6 and got == clean and got_c == clean
    assert len([f for f in os.listdir(tmp_path / "cache") if f.endswith(".tar")]) == 6


@pytest.mark.slow
def test_s3_throttling(s3_env, monkeypatch, tmp_path, clean, clean_batches):
    """A front answers every 3rd S3 request with 503 SlowDown or 500 InternalError (XML body,
    none for HEAD): retried, nothing lost, in process and in 2 DataLoader workers."""
    with S3FaultProxy(s3_env.port, fail_every=3) as front:
        _s3_through(monkeypatch, front.url)
        cfg = _config(tmp_path, "s3", f"s3://{BUCKET}")
        before = wio.stats.retries
        got = _samples(cfg)
        in_process = wio.stats.retries - before
        got_w = _batch_samples(_build(cfg, 2))
        injected, total = front.errors_sent, front.requests
    clean_w = clean_batches[2]
    lost, dup = _diff(clean, got)
    lost_w, dup_w = _diff(clean_w, got_w)
    record(
        "network",
        "s3 throttling",
        injected=injected,
        tried=len(clean) + len(clean_w),
        lost=lost + lost_w,
        duplicated=dup + dup_w,
        detected=in_process,
        note=f"every 3rd of {total} requests: 503 SlowDown / 500 InternalError; in process "
        f"and 2 DataLoader workers (worker retries not counted in 'detected')",
    )
    assert injected >= 10 and in_process >= 1
    assert got == clean and got_w == clean_w
    wio.reset_clients()


# --- a shard that vanishes ----------------------------------------------------------------------


def _shard_keys(root: str, rel: str) -> set:
    from wds_tools.reader import Shard

    return set(Shard.open(os.path.join(root, rel)).keys)


def _vanish(backend: str, root: str, s3srv, rel: str) -> None:
    if backend == "http":
        os.remove(os.path.join(root, rel))
    else:
        s3srv.client().delete_object(Bucket=BUCKET, Key=f"copy/{rel}")


@pytest.mark.parametrize("backend", ["http", "s3"])
@pytest.mark.parametrize("when", ["after listing", "mid-stream"])
def test_vanished_shard(backend, when, remote_dataset, s3_env, tmp_path, clean_batches):
    """A data shard deleted after the loader listed the manifests (before any read, or after
    the first batch): ``on_error: fail`` raises FileNotFoundError naming it, at once, without
    retries; ``on_error: skip`` loses exactly the rest of that shard and nothing else, in
    order, and reports it."""
    root = str(tmp_path / "www")
    shutil.copytree(remote_dataset, root)
    rel = "ds/shard-r00000-000001.tar"
    vanished = _shard_keys(root, rel)
    if backend == "s3":
        for n in ("ds", "ds2"):
            s3_env.upload_folder(os.path.join(root, n), BUCKET, f"copy/{n}")
    outcomes = {}
    with ScriptedHTTPServer(root) as srv:
        base = srv.url if backend == "http" else f"s3://{BUCKET}/copy"
        for on_error in ("fail", "skip"):
            if backend == "http":
                shutil.copy(os.path.join(remote_dataset, rel), os.path.join(root, rel))
            else:
                s3_env.client().upload_file(os.path.join(remote_dataset, rel), BUCKET, f"copy/{rel}")
            ld = _build(_config(tmp_path, on_error, base, on_error))
            got, err = [], None
            if when == "after listing":
                _vanish(backend, root, s3_env, rel)
            before = wio.stats.retries
            t = time.monotonic()
            try:
                it = iter(ld)
                for i, b in enumerate(it):
                    got += _batch(b)
                    if i == 0 and when == "mid-stream":
                        _vanish(backend, root, s3_env, rel)
            except OSError as e:
                err = e
            outcomes[on_error] = (got, err, time.monotonic() - t, wio.stats.retries - before, ld.stats())
    got_f, err_f, t_f, retries_f, _ = outcomes["fail"]
    assert isinstance(err_f, FileNotFoundError), err_f
    assert "shard-r00000-000001.tar" in str(err_f) and t_f < 5 and retries_f == 0
    got_s, err_s, _, retries_s, st = outcomes["skip"]
    assert err_s is None and retries_s == 0
    clean_b = clean_batches[0]
    lost, dup = _diff(clean_b, got_s)
    missing = {k for k, _ in (Counter(clean_b) - Counter(got_s)).elements()}
    skipped = st["datasets"][0]["skipped_samples"]
    record(
        "network",
        f"vanished shard ({backend}, {when})",
        injected=2,
        tried=2 * len(clean_b),
        lost=lost,
        duplicated=dup,
        detected=int(err_f is not None) + st["skipped_shards"],
        note=f"fail: FileNotFoundError in {t_f:.2f}s, 0 retries; skip: the {lost} lost are "
        f"the unread rest of the vanished shard, reported (skipped_samples={skipped}, both epochs); "
        f"the {dup} repeated are its documented replacements from the next epoch "
        f"(equal batch counts on every rank)",
    )
    # every lost sample is one of the vanished shard's, each reported as skipped
    assert missing and missing <= vanished and lost <= skipped and st["skipped_shards"] >= 1
    if when == "after listing":
        assert missing == vanished
    # docs/streaming.md: batch counts stay as planned; the replacements come from the next
    # epoch of the same dataset, at most as many as were skipped; nothing else changes
    assert len(got_s) == len(clean_b) and dup <= skipped
    assert [x for x in got_s if x[0][0] == "t"] == [x for x in clean_b if x[0][0] == "t"]
    # (a partition that skips reaches its later samples sooner, so the order across the
    # partitions shifts; every sample read is one of the clean run's)
    assert {x for x in got_s if x[0][0] == "s"} <= {x for x in clean_b if x[0][0] == "s"}


# --- servers that never recover -----------------------------------------------------------------


@pytest.mark.parametrize("backend", ["http", "s3"])
def test_retries_exhausted_clear_error(backend, remote_dataset, s3_env, monkeypatch, tmp_path):
    """Every request fails once the loader has listed its manifests: the read gives up after
    exactly max_retries + 1 attempts, with an IOError naming the object, the byte and the last
    error, quickly (bounded backoff), in process and from a DataLoader worker."""
    opts = wio.IOOptions(timeout=1.0, connect_timeout=1.0, max_retries=3, backoff=0.01, max_backoff=0.05)
    front_cls = ScriptedHTTPServer if backend == "http" else S3FaultProxy
    arg = remote_dataset if backend == "http" else s3_env.port
    errors, injected, attempts = [], 0, []
    for workers in (0, 2):
        with front_cls(
            arg, fail_every=0, **({"fail_codes": (503,)} if backend == "http" else {"codes": (503,)})
        ) as srv:
            if backend == "http":
                cfg = _config(tmp_path, "x", srv.url)
            else:
                _s3_through(monkeypatch, srv.url)
                cfg = _config(tmp_path, "x", f"s3://{BUCKET}")
            ld = _build(cfg, workers, opts)
            srv.fail_all = True
            n0 = srv.errors_sent
            t = time.monotonic()
            with pytest.raises(OSError) as e:
                for _ in ld:
                    pass
            elapsed = time.monotonic() - t
            attempts.append(srv.errors_sent - n0)
            injected += srv.errors_sent - n0
            errors.append((str(e.value), elapsed))
    for msg, elapsed in errors:
        assert "giving up after 3 retries" in msg and ("503" in msg or "SlowDown" in msg), msg
        assert "max retries: 0" not in msg, msg  # botocore's own count, not ours
        assert ("ds/" in msg or "ds2/" in msg) and elapsed < 10
    assert attempts[0] == 4  # in process: exactly max_retries + 1 attempts, then the error
    record(
        "network",
        f"retries exhausted ({backend})",
        injected=injected,
        tried=2,
        detected=len(errors),
        note=f"max_retries=3: IOError 'giving up after 3 retries' in "
        f"{', '.join(f'{t:.2f}s' for _, t in errors)} (in process, 2 workers); "
        f"{attempts[0]} attempts in process",
    )
    wio.reset_clients()
