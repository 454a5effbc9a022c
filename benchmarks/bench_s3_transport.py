#!/usr/bin/env python
"""S3 transport against ``curl``, by object size: where the per-request cost goes.

``bench_stream`` compares transport on its dataset's 6.75 MB shards; a request costs the S3
client about a millisecond of CPU (botocore: signing, event hooks, parsing) whatever its size,
so the ratio to ``curl`` depends on the object size. This benchmark measures, in one run, for
each ``--sizes`` (MB) objects of random bytes in moto's S3 server (its own process, 127.0.0.1):

- ``curl``: one ``curl`` process fetching every object through presigned URLs (keep-alive);
- ``wds_tools.io.open_range``: every object read whole through ``s3://`` (boto3 ``get_object``,
  the read path of the reader and the loader).

About ``--total`` MB per size; best of ``--repeat`` passes after a warm-up pass. Prints a table and, unless
``--no-docs``, replaces the ``bench_s3_transport`` section of ``docs/benchmarks.md``.

    python benchmarks/bench_s3_transport.py
    python benchmarks/bench_s3_transport.py --sizes 1,4 --total 8 --repeat 1 --no-docs   # smoke
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from typing import Callable, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [HERE, ROOT, os.path.join(ROOT, "tests")]

from bench_reader import DOCS, machine, write_docs  # noqa: E402
from bench_stream import _restore_environ  # noqa: E402

BUCKET = "bench-transport"


def best_seconds(fn: Callable[[], None], repeat: int) -> float:
    """Best of ``repeat`` timed passes after one untimed pass (client set-up, connections)."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def measure(sizes: List[int], total_mb: int, repeat: int) -> List[str]:
    """Table rows, one per object size: moto in its own process, objects uploaded, both read."""
    from wds_tools import io as wio

    from servers import MotoS3Server

    rows = []
    with MotoS3Server(process=True) as moto:
        os.environ.update(moto.env)
        wio.reset_clients()
        opts = wio.IOOptions()
        c = moto.client()
        c.create_bucket(Bucket=BUCKET)
        for mb in sizes:
            n = max(1, total_mb // mb)
            body = os.urandom(mb << 20)
            keys = [f"{mb}mb/{i:04d}" for i in range(n)]
            for k in keys:
                c.put_object(Bucket=BUCKET, Key=k, Body=body)
            del body
            presigned = [
                c.generate_presigned_url("get_object", ExpiresIn=3600, Params={"Bucket": BUCKET, "Key": k})
                for k in keys
            ]

            def curl(presigned: List[str] = presigned) -> None:
                subprocess.run(["curl", "-s", "-f", *presigned], stdout=subprocess.DEVNULL, check=True)

            def ours(keys: List[str] = keys) -> None:
                for k in keys:
                    with wio.open_range(f"s3://{BUCKET}/{k}", 0, None, opts) as f:
                        while f.read(4 << 20):
                            pass

            nbytes = n * (mb << 20)
            t_curl, t_ours = best_seconds(curl, repeat), best_seconds(ours, repeat)
            rows.append(
                f"| {mb} MB x {n} | {nbytes / t_curl / 1e6:,.0f} | "
                f"{nbytes / t_ours / 1e6:,.0f} | {t_curl / t_ours:.0%} | "
                f"{(t_ours - t_curl) / n * 1e3:+.2f} ms |"
            )
            print(f"  {mb} MB: curl {t_curl:.3f}s, wds_tools {t_ours:.3f}s", file=sys.stderr)
            for k in keys:
                c.delete_object(Bucket=BUCKET, Key=k)
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="2,8,64", help="object sizes in MB, comma-separated")
    p.add_argument("--total", type=int, default=256, help="MB per size (at least one object)")
    p.add_argument("--repeat", type=int, default=5, help="passes per row; the best counts")
    p.add_argument("--docs", default=DOCS, help="markdown file to update")
    p.add_argument("--no-docs", action="store_true", help="print only")
    args = p.parse_args(argv)
    if shutil.which("curl") is None:
        print("curl is not installed", file=sys.stderr)
        return 2
    saved_env = dict(os.environ)
    try:
        rows = measure([int(s) for s in args.sizes.split(",") if s], args.total, args.repeat)
    finally:
        _restore_environ(saved_env)
    table = (
        "| objects | curl MB/s | wds_tools.io MB/s | wds_tools / curl | extra time per "
        "object |\n|---|---:|---:|---:|---:|\n" + "\n".join(rows)
    )
    print(table)
    if not args.no_docs:
        write_docs(
            "bench_s3_transport",
            f"`python benchmarks/bench_s3_transport.py --sizes {args.sizes} --total "
            f"{args.total} --repeat {args.repeat}`: moto S3 in its own process on "
            f"127.0.0.1, random bytes, best of {args.repeat} passes; {machine()}; "
            f"{time.strftime('%Y-%m-%d')}.\n\n{table}",
            args.docs,
        )
        print(f"updated {args.docs}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
