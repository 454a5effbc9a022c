"""Load: 2 data-parallel ranks x 8 DataLoader workers stream an unbounded mix of one dataset
from nginx (HTTP ranges) and one from moto (S3) for ``RELIABILITY_LOAD_SECONDS`` (default 30;
CI stays fast, the figures in docs/reliability.md come from a longer run).

Checked: the resident memory of every process of both ranks (rank + workers, sampled every
0.5 s from outside) shows no growth trend after the warm-up; each rank's open file descriptors
and child processes are back to their count before iterating once the loader is shut down;
no process is left behind after the ranks exit; batches keep flowing on both ranks and carry
the configured mix. Figures go to ``reliability_log.record`` (category "load").

Run one rank by hand: ``python tests/test_reliability_load.py CONFIG RANK WORLD SECONDS OUT``.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

import pytest

DEFAULT_SECONDS = 30.0


def _fd_targets() -> list:
    """What this process's descriptors point at (for the report when a count differs)."""
    out = []
    for f in os.listdir("/proc/self/fd"):
        try:
            out.append(f"{f}:{os.readlink(f'/proc/self/fd/{f}')}")
        except OSError:  # the descriptor of the listing itself, closed by now
            pass
    return sorted(out)


def _open_fds() -> int:
    return len(_fd_targets())


def _children() -> list:
    import psutil

    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    ]


def run_rank(cfg: str, rank: int, world: int, seconds: float, out: str) -> None:
    """One rank: iterate for ``seconds``, shut the loader down, report counts as JSON."""
    from wds_tools import io as wio
    from wds_tools.loader import build_loader

    opts = wio.IOOptions(timeout=10, connect_timeout=5, backoff=0.05, max_backoff=1.0)
    loader = build_loader(
        cfg,
        rank=rank,
        world_size=world,
        batch_size=8,
        num_workers=8,
        max_seq_len=256,
        pad_id=0,
        io_options=opts,
        prefetch_factor=2,
    )
    gc.collect()
    fds0, kids0 = _open_fds(), len(_children())
    fd_list0 = _fd_targets()
    t0 = time.monotonic()
    it = iter(loader)
    batches = samples = 0
    first_batch_s = None
    per_ds: dict = {}
    for b in it:
        if first_batch_s is None:
            first_batch_s = time.monotonic() - t0
        batches += 1
        samples += len(b["__key__"])
        for d in b["dataset"]:
            per_ds[d] = per_ds.get(d, 0) + 1
        if time.monotonic() - t0 >= seconds:
            break
    elapsed = time.monotonic() - t0
    kids_running = len(_children())
    t1 = time.monotonic()
    it.close()  # what a training loop leaving the epoch does: workers shut down
    del it, b
    gc.collect()
    deadline = time.monotonic() + 15
    while _children() and time.monotonic() < deadline:
        time.sleep(0.1)
    # multiprocessing queues close their write ends from a feeder thread after the sentinel
    # went out; on a loaded machine that lags the workers' exit. A leak stays past the deadline.
    t2 = time.monotonic()
    fds_unsettled = _open_fds() - fds0
    while _open_fds() > fds0 and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.1)
    fds_settle_s = time.monotonic() - t2
    shutdown_s = time.monotonic() - t1
    res = {
        "rank": rank,
        "batches": batches,
        "samples": samples,
        "seconds": elapsed,
        "first_batch_s": first_batch_s,
        "per_dataset": per_ds,
        "fds_before": fds0,
        "fds_after": _open_fds(),
        "children_before": kids0,
        "children_running": kids_running,
        "children_after": len(_children()),
        "shutdown_s": shutdown_s,
        "fds_unsettled": fds_unsettled,
        "fds_settle_s": fds_settle_s,
        "fd_targets_before": fd_list0,
        "fd_targets_after": _fd_targets(),
        "stats": loader.stats()["datasets"],
    }
    with open(out, "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    run_rank(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5])
    sys.exit(0)


# --- the test -----------------------------------------------------------------------------------

import yaml  # noqa: E402

from reliability_log import record  # noqa: E402
from servers import BUCKET  # noqa: E402

psutil = pytest.importorskip("psutil")
pytest.importorskip("torch")


def _tree_rss(pids) -> int:
    total = 0
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs = [p] + p.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for q in procs:
            try:
                total += q.memory_info().rss
            except psutil.NoSuchProcess:
                pass
    return total


def _slope(xs, ys) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0


@pytest.mark.reliability
@pytest.mark.network
@pytest.mark.slow
def test_two_ranks_eight_workers_nginx_and_moto(nginx, s3, tmp_path):
    seconds = float(os.environ.get("RELIABILITY_LOAD_SECONDS", DEFAULT_SECONDS))
    cfg = tmp_path / "load.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "seed": 3,
                "on_error": "fail",
                "shuffle": {"shards": True, "samples": True, "block_size": 8, "window_blocks": 2},
                "datasets": [
                    {"name": "http", "manifest": f"{nginx.url}/ds/index.json", "weight": 0.5},
                    {"name": "s3", "manifest": f"s3://{BUCKET}/ds2/index.json", "weight": 0.5},
                ],
            }
        )
    )
    env = dict(os.environ, **s3.env)
    for k in (
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
    ):
        env.pop(k, None)
    here = os.path.dirname(os.path.abspath(__file__))
    env["PYTHONWARNINGS"] = "ignore::UserWarning"  # torch: 8 workers on a 2-core machine
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(here), env.get("PYTHONPATH", "")])
    me = psutil.Process()
    servers = {nginx.proc.pid}
    kids0 = {p.pid for p in me.children(recursive=True)} - servers
    fds0 = len(os.listdir("/proc/self/fd"))
    outs = [str(tmp_path / f"rank{r}.json") for r in range(2)]
    t0 = time.monotonic()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), str(cfg), str(r), "2", str(seconds), outs[r]], env=env
        )
        for r in range(2)
    ]
    samples = []  # (t, rss of both rank trees)
    limit = seconds + 120
    try:
        while any(p.poll() is None for p in procs):
            if time.monotonic() - t0 > limit:
                raise AssertionError(f"ranks still running after {limit:.0f}s")
            samples.append((time.monotonic() - t0, _tree_rss([p.pid for p in procs])))
            time.sleep(0.5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    total_s = time.monotonic() - t0
    assert [p.returncode for p in procs] == [0, 0]
    res = [json.load(open(o)) for o in outs]
    time.sleep(0.2)
    leftover = (
        {p.pid for p in me.children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE} - servers - kids0
    )
    fds1 = len(os.listdir("/proc/self/fd"))

    # memory: no growth trend once every worker streams (after the first batch + a third of
    # the run), judged on the samples taken while the workers ran
    start = max(r["first_batch_s"] for r in res) + seconds / 3
    end = min(r["seconds"] for r in res) + 1.0
    steady = [(t, m) for t, m in samples if start <= t <= end and m > 0]
    assert len(steady) >= 8, f"too few steady samples ({len(steady)}) for {seconds}s"
    xs, ys = [t for t, _ in steady], [m for _, m in steady]
    slope = _slope(xs, ys)  # bytes per second
    mean = sum(ys) / len(ys)
    growth_per_min = slope * 60
    peak = max(m for _, m in samples)
    note = (
        f"{seconds:.0f}s streaming (total {total_s:.0f}s incl. start/shutdown); "
        f"{sum(r['batches'] for r in res)} batches, {sum(r['samples'] for r in res)} samples "
        f"({sum(r['samples'] for r in res) / min(r['seconds'] for r in res):.0f}/s); "
        f"peak RSS sum of 18 processes (shared pages counted in each) {peak / 2**20:.0f} MiB, steady mean "
        f"{mean / 2**20:.0f} MiB, trend {growth_per_min / 2**20:+.1f} MiB/min; "
        f"FDs per rank {[r['fds_after'] - r['fds_before'] for r in res]}, child processes "
        f"per rank {[r['children_after'] - r['children_before'] for r in res]} after "
        f"shutdown ({max(r['shutdown_s'] for r in res):.1f}s), "
        f"{len(leftover)} left behind, test FDs {fds1 - fds0:+d}"
    )
    record(
        "load",
        "8 workers x 2 ranks nginx/moto",
        injected=0,
        tried=sum(r["samples"] for r in res),
        detected=0,
        note=note,
    )
    print(note)
    print(
        "fds:",
        [(r["fds_before"], r["fds_unsettled"], round(r["fds_settle_s"], 2), r["fds_after"]) for r in res],
    )
    for r in res:
        assert r["batches"] > 0 and r["children_running"] >= 8, r
        assert r["children_after"] == r["children_before"], r
        assert r["fds_after"] <= r["fds_before"], (r["fd_targets_before"], r["fd_targets_after"])
        assert set(r["per_dataset"]) == {"http", "s3"}
        share = r["per_dataset"]["http"] / r["samples"]
        assert 0.4 < share < 0.6, r["per_dataset"]
    assert not leftover, leftover
    assert fds1 <= fds0 + 4, (fds0, fds1)  # moto's own keep-alive sockets at most
    # growth over a whole run below 5% of the steady footprint (and at most 64 MiB/min)
    drift = slope * (xs[-1] - xs[0])
    assert drift < max(0.05 * mean, 16 << 20) and growth_per_min < 64 << 20, note
