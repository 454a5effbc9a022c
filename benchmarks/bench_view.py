#!/usr/bin/env python
"""``wds-tools view`` at 10 million samples: start-up, page latency and peak memory.

Writes a real dataset (``--samples`` samples of ~``--tokens`` tokens, 1,000 per shard), then a
synthetic manifest of ``--big-shards`` entries cycling over those shards
(``bench_stream.write_big_manifest``: 10,000 x 1,000 = 10 million samples by default), starts
``python -m wds_tools.view BIG --port 0`` as a fresh process and measures, over HTTP:

- time from launch to the printed URL, and from launch to the first overview page answered;
- the overview request itself (it reads ``--stats-shards`` shard indexes and up to 1 MiB of
  samples of each, on the first request);
- a page of the sample list in the middle of the dataset, the last sample's page, its raw
  bytes and a bounded key search;
- the server's peak RSS (``VmHWM`` of its ``/proc/PID/status``: that process's own
  high-water mark, not the parent's ``ru_maxrss``) and the shard indexes it read.

Prints a table and, unless ``--no-docs``, replaces the ``bench_view`` section of
``docs/benchmarks.md``.

    python benchmarks/bench_view.py
    python benchmarks/bench_view.py --samples 2000 --big-shards 100 --no-docs   # smoke
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Optional, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench_reader import DOCS, machine, make_dataset, write_docs  # noqa: E402
from bench_stream import write_big_manifest  # noqa: E402

TARGET_OVERVIEW_S = 1.0
TARGET_RSS_MB = 300


def fetch(port: int, target: str) -> Tuple[float, int, int]:
    """(seconds, status, body bytes) of one GET."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", target)
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return time.perf_counter() - t0, r.status, len(body)


def peak_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc (Linux only)")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc (Linux only)")


def run_viewer(manifest: str, stats_shards: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wds_tools.view",
            manifest,
            "--port",
            "0",
            "--stats-shards",
            str(stats_shards),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = None
        while url is None:
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"viewer exited: {p.stderr.read()}")
            if line.startswith("open http://"):
                url = line.split()[1]
        t_url = time.perf_counter() - t0
        port = int(url.rstrip("/").rsplit(":", 1)[1])
        rss_start = rss_mb(p.pid)
        rows = {}
        rows["overview (first request)"] = fetch(port, "/")
        t_first = time.perf_counter() - t0
        rows["overview (again)"] = fetch(port, "/")
        rows["sample list, page at 5,000,000"] = fetch(port, "/d/0/samples?start=5000000")
        rows["last sample's page"] = fetch(port, "/d/0/s/9999999")
        rows["last sample's raw bytes"] = fetch(port, "/d/0/raw/9999999")
        rows["key search (bounded: 2 s)"] = fetch(port, "/d/0/samples?q=zzz&field=key")
        for name, (_, status, _) in rows.items():
            if status != 200:
                raise RuntimeError(f"{name}: HTTP {status}")
        return {
            "t_url": t_url,
            "t_first": t_first,
            "rows": rows,
            "rss_start": rss_start,
            "peak": peak_mb(p.pid),
        }
    finally:
        p.terminate()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--samples", type=int, default=4_000, help="samples in the real dataset")
    ap.add_argument("--tokens", type=int, default=2_400, help="mean tokens per sample")
    ap.add_argument(
        "--big-shards", type=int, default=10_000, help="entries (of 1,000 samples) in the synthetic manifest"
    )
    ap.add_argument("--stats-shards", type=int, default=16, help="the viewer's --stats-shards")
    ap.add_argument("--repeat", type=int, default=3, help="fresh viewer processes; the best counts")
    ap.add_argument("--docs", default=DOCS, help="markdown file to update")
    ap.add_argument("--no-docs", action="store_true", help="print only")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="bench_view_")
    try:
        folder = os.path.join(tmp, "ds")
        print(f"writing {args.samples:,} samples of ~{args.tokens:,} tokens", file=sys.stderr)
        make_dataset(folder, args.samples, args.tokens)
        big = write_big_manifest(folder, args.big_shards)
        n = args.big_shards * 1000
        runs = [run_viewer(big, args.stats_shards) for _ in range(args.repeat)]
        best = min(runs, key=lambda r: r["t_first"])
        peak = max(r["peak"] for r in runs)
        lines = [
            "| measure | value | target |",
            "|---|---:|---:|",
            f"| launch to URL printed (imports, manifest of {args.big_shards:,} shards) | "
            f"{best['t_url']:.2f} s | - |",
            f"| launch to first overview answered | {best['t_first']:.2f} s | - |",
        ]
        for name, (sec, _, nbytes) in best["rows"].items():
            target = f"< {TARGET_OVERVIEW_S:.0f} s" if name == "overview (first request)" else "-"
            lines.append(f"| {name} | {sec * 1000:,.0f} ms ({nbytes / 1024:,.0f} KiB) | {target} |")
        lines.append(f"| RSS after start | {best['rss_start']:.0f} MB | - |")
        lines.append(f"| peak RSS (VmHWM), worst of {len(runs)} | {peak:.0f} MB | < {TARGET_RSS_MB} MB |")
        table = "\n".join(lines)
        ov = best["rows"]["overview (first request)"][0]
        verdict = "met" if ov < TARGET_OVERVIEW_S and peak < TARGET_RSS_MB else "NOT met"
        body = (
            f"`python benchmarks/bench_view.py --samples {args.samples} --tokens {args.tokens} "
            f"--big-shards {args.big_shards} --repeat {args.repeat}`: a manifest of "
            f"{n:,} samples ({args.big_shards:,} shard entries cycling over "
            f"{-(-args.samples // 1000)} real shards of 1,000 samples of ~{args.tokens:,} "
            f"tokens), a fresh `wds-tools view` process per run (best of {len(runs)}), "
            f"`--stats-shards {args.stats_shards}`; {machine()}; "
            f"{time.strftime('%Y-%m-%d')}. Targets (overview < 1 s, < 300 MB): {verdict}."
            f"\n\n{table}"
        )
        print(table)
        if not args.no_docs:
            write_docs("bench_view", body, args.docs)
            print(f"updated {args.docs}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
