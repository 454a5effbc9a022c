#!/usr/bin/env python
"""Streaming throughput from disk, nginx and moto S3: this loader vs plain webdataset vs curl.

One run, on one dataset (``--samples`` samples of ~``--tokens`` tokens, 1,000 per shard):

- for each source (local disk, nginx on 127.0.0.1, moto's S3 server on 127.0.0.1):
  - ``curl``: one ``curl`` process fetching every shard (remote sources only): the transport
    ceiling that remote throughput is compared with;
  - plain webdataset, single process: ``WebDataset(urls, nodesplitter=split_by_node,
    workersplitter=split_by_worker).decode()`` (HTTP and S3 through its ``curl`` pipe; S3 with
    presigned URLs, as plain webdataset has no S3 client);
  - ``wds_tools.reader.iter_samples`` (ids + labels + meta per sample), single process;
  - the loader (``build_loader``, batches of 16 padded samples, in-process);
  - DataLoader rows, 2 workers, batches of 16 padded samples: the loader, and plain webdataset
    with ``.batched(16)`` and a padding collate;
- time to first batch and peak RSS of a fresh process opening a synthetic manifest of
  ``--big-shards`` shards x 1,000 samples (10,000 x 1,000 = 10 million by default; its entries
  reuse the real shard files, as only a few are read before the first batch).

Every row is the best of ``--repeat`` passes. Prints a table and, unless ``--no-docs``,
replaces the ``bench_stream`` section of ``docs/benchmarks.md``.

    python benchmarks/bench_stream.py
    python benchmarks/bench_stream.py --samples 2000 --repeat 1 --big-shards 100 --no-docs  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench_reader import DOCS, dataset_bytes, machine, make_dataset, write_docs  # noqa: E402

BUCKET = "bench"
BATCH = 16
MAX_LEN = 4096


# --- passes: each returns an iterable of (samples, tokens) increments ---------------------------


def best_of(fn: Callable[[], Iterable[Tuple[int, int]]], repeat: int) -> Dict[str, float]:
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = tok = 0
        for a, b in fn():
            n += a
            tok += b
        dt = time.perf_counter() - t0
        if best is None or dt < best["seconds"]:
            best = {"samples": n, "tokens": tok, "seconds": dt}
    return best


def curl_pass(urls: List[str]):
    def run():
        subprocess.run(["curl", "-s", "-f", *urls], stdout=subprocess.DEVNULL, check=True)
        return iter(())

    return run


def io_pass(urls: List[str], opts):
    """Raw bytes of every shard through ``wds_tools.io.open_range``: our transport vs curl."""
    from wds_tools import io as wio

    def run():
        for u in urls:
            with wio.open_range(u, 0, None, opts) as f:
                while f.read(4 << 20):
                    pass
        return iter(())

    return run


def wds_dataset(urls: List[str]):
    import webdataset as wds

    return wds.WebDataset(
        urls,
        shardshuffle=False,
        nodesplitter=wds.split_by_node,
        workersplitter=wds.split_by_worker,
        empty_check=False,
    ).decode()


def wds_pass(urls: List[str]):
    return lambda: ((1, s["input_ids.npy"].size) for s in wds_dataset(urls))


def reader_pass(manifest: str, opts):
    from wds_tools.reader import iter_samples

    return lambda: ((1, s["input_ids"].size) for s in iter_samples(manifest, opts=opts))


def _config(manifest: str) -> "object":
    from wds_tools.config import parse_data_config

    return parse_data_config(
        {"seed": 0, "datasets": [{"name": "bench", "manifest": manifest, "weight": 1.0}]}
    )


def loader_pass(manifest: str, opts, num_workers: int, num_samples: int):
    """The loader (default shuffle: shard order and windows of blocks) for ``num_samples``
    samples of the endless stream, i.e. about one epoch."""
    from wds_tools.loader import build_loader

    def run():
        loader = build_loader(
            _config(manifest),
            rank=0,
            world_size=1,
            batch_size=BATCH,
            num_workers=num_workers,
            max_seq_len=MAX_LEN,
            pad_id=0,
            io_options=opts,
        )
        n = 0
        for b in loader:
            k = len(b["__key__"])
            yield k, int(b["attention_mask"].numpy().sum())  # numpy: no torch thread pool
            n += k
            if n + BATCH > num_samples:
                break

    return run


def _pad_collate(samples):
    import torch

    n = max(s["input_ids.npy"].size for s in samples)
    ids = np.zeros((len(samples), n), np.int64)
    labels = np.full((len(samples), n), -100, np.int64)
    mask = np.zeros((len(samples), n), np.int64)
    for i, s in enumerate(samples):
        x = s["input_ids.npy"]
        ids[i, : x.size] = x
        mask[i, : x.size] = 1
        for a, b in s["json"]["supervised"]:
            labels[i, a:b] = x[a:b]
    return {
        "input_ids": torch.from_numpy(ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
        "__key__": [s["__key__"] for s in samples],
    }


def wds_dataloader_pass(urls: List[str], num_workers: int):
    from torch.utils.data import DataLoader

    def run():
        ds = wds_dataset(urls).batched(BATCH, collation_fn=_pad_collate, partial=True)
        for b in DataLoader(ds, batch_size=None, num_workers=num_workers, prefetch_factor=4):
            yield len(b["__key__"]), int(b["attention_mask"].numpy().sum())

    return run


# --- first batch at 10 million samples ---------------------------------------------------------


def write_big_manifest(folder: str, num_shards: int) -> str:
    """``big.json`` beside ``index.json``: ``num_shards`` entries cycling over the real shards."""
    with open(os.path.join(folder, "index.json")) as f:
        m = json.load(f)
    real = m["shards"]
    shards = []
    for i in range(num_shards):
        e = dict(real[i % len(real)], rank=0, shard_id=i)
        shards.append(e)
    m.update(
        shards=shards,
        num_shards=num_shards,
        num_samples=sum(e["num_samples"] for e in shards),
        num_tokens=sum(e["num_tokens"] for e in shards),
        num_supervised=sum(e["num_supervised"] for e in shards),
        bytes=sum(e["bytes"] for e in shards),
    )
    path = os.path.join(folder, "big.json")
    with open(path, "w") as f:
        json.dump(m, f, separators=(",", ":"))
    return path


_FIRST_BATCH = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import torch, wds_tools.loader as L
from wds_tools.config import parse_data_config
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
def peak_mb():
    # VmHWM: this process image's high-water mark. ru_maxrss is not: Linux carries it over
    # fork and exec, so a child of a big benchmark process reports its parent's peak.
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
rss0 = rss_mb()
t1 = time.perf_counter()
cfg = parse_data_config({"seed": 0, "datasets": [{"name": "big", "manifest": sys.argv[1]}]})
loader = L.build_loader(cfg, rank=0, world_size=1, batch_size=16, num_workers=0,
                        max_seq_len=4096)
b = next(iter(loader))
t2 = time.perf_counter()
n = loader.plans[0].num_samples
print(json.dumps({"first_batch_s": t2 - t1, "import_s": t1 - t0, "num_samples": n,
                  "rss_mb": peak_mb(),
                  "rss_imports_mb": rss0, "rss_now_mb": rss_mb(),
                  "batch": list(b["input_ids"].shape)}))
"""


def first_batch(manifest: str, env: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _FIRST_BATCH, manifest],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- run -------------------------------------------------------------------------------------


def _fmt_row(
    source: str, name: str, r: dict, nbytes: int, wds_sps: Optional[float], curl_mbs: Optional[float]
) -> str:
    mbs = nbytes / r["seconds"] / 1e6
    cells = [source, name, "-", "-", f"{mbs:,.0f}", "-", f"{mbs / curl_mbs:.0%}" if curl_mbs else "-"]
    if r["samples"]:
        sps = r["samples"] / r["seconds"]
        cells[2], cells[3] = f"{sps:,.0f}", f"{r['tokens'] / r['seconds'] / 1e6:,.1f}"
        if wds_sps:
            cells[5] = f"{sps / wds_sps:.1f}x"
    return "| " + " | ".join(cells) + " |"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=20_000, help="samples in the dataset")
    p.add_argument("--tokens", type=int, default=2_400, help="mean tokens per sample")
    p.add_argument("--repeat", type=int, default=3, help="passes per row; the best counts")
    p.add_argument(
        "--big-shards", type=int, default=10_000, help="shards (of 1,000 samples) in the first-batch manifest"
    )
    p.add_argument("--sources", default="disk,nginx,s3", help="comma-separated subset")
    p.add_argument("--docs", default=DOCS, help="markdown file to update")
    p.add_argument("--no-docs", action="store_true", help="print only")
    args = p.parse_args(argv)
    sources = args.sources.split(",")

    import webdataset  # noqa: F401

    import wds_tools.loader  # noqa: F401
    from wds_tools import io as wio

    from servers import MotoS3Server, NginxServer, find_nginx

    www = tempfile.mkdtemp(prefix="bench_stream_")
    saved_env = dict(os.environ)
    servers = []
    try:
        folder = os.path.join(www, "ds")
        print(f"writing {args.samples:,} samples of ~{args.tokens:,} tokens", file=sys.stderr)
        make_dataset(folder, args.samples, args.tokens)
        big = write_big_manifest(folder, args.big_shards)
        nbytes = dataset_bytes(folder)
        shard_names = [s["path"] for s in json.load(open(os.path.join(folder, "index.json")))["shards"]]
        opts = wio.IOOptions()
        src: Dict[str, dict] = {}
        if "disk" in sources:
            src["disk"] = {
                "manifest": os.path.join(folder, "index.json"),
                "big": big,
                "urls": [os.path.join(folder, n) for n in shard_names],
            }
        if "nginx" in sources:
            if find_nginx() is None:
                print("nginx not installed: skipping the nginx rows", file=sys.stderr)
            else:
                ng = NginxServer(www).start()
                servers.append(ng)
                src["nginx"] = {
                    "manifest": f"{ng.url}/ds/index.json",
                    "big": f"{ng.url}/ds/big.json",
                    "urls": [f"{ng.url}/ds/{n}" for n in shard_names],
                    "curl": True,
                    "io_urls": [f"{ng.url}/ds/{n}" for n in shard_names],
                }
        env = dict(os.environ)
        if "s3" in sources:
            moto = MotoS3Server(process=True).start()
            servers.append(moto)
            print("uploading to moto", file=sys.stderr)
            moto.upload_folder(folder, BUCKET, "ds")
            os.environ.update(moto.env)
            env.update(moto.env)
            c = moto.client()
            src["moto S3"] = {
                "manifest": f"s3://{BUCKET}/ds/index.json",
                "big": f"s3://{BUCKET}/ds/big.json",
                "urls": [
                    c.generate_presigned_url(
                        "get_object", Params={"Bucket": BUCKET, "Key": f"ds/{n}"}, ExpiresIn=3600
                    )
                    for n in shard_names
                ],
                "curl": True,
                "io_urls": [f"s3://{BUCKET}/ds/{n}" for n in shard_names],
            }

        rows: List[str] = []
        summary: Dict[str, dict] = {}
        for name, s in src.items():
            res: Dict[str, Optional[dict]] = {}
            plan = []
            if s.get("curl"):
                plan.append(("curl (transport only)", curl_pass(s["urls"])))
                plan.append(("wds_tools.io open_range (transport only)", io_pass(s["io_urls"], opts)))
            plan += [
                ("plain webdataset, 1 process", wds_pass(s["urls"])),
                ("wds_tools iter_samples, 1 process", reader_pass(s["manifest"], opts)),
                (
                    f"wds_tools loader, 1 process, batch {BATCH} padded",
                    loader_pass(s["manifest"], opts, 0, args.samples),
                ),
                (
                    f"plain webdataset, DataLoader 2 workers, batch {BATCH} padded",
                    wds_dataloader_pass(s["urls"], 2),
                ),
                (
                    f"wds_tools loader, DataLoader 2 workers, batch {BATCH} padded",
                    loader_pass(s["manifest"], opts, 2, args.samples),
                ),
            ]
            for row, fn in plan:
                r = best_of(fn, args.repeat)
                res[row] = r
                print(
                    f"  {name}: {row}: {r['samples'] / r['seconds']:,.0f} samples/s, "
                    f"{nbytes / r['seconds'] / 1e6:,.0f} MB/s",
                    file=sys.stderr,
                )
            wds_sps = (lambda r: r["samples"] / r["seconds"])(res["plain webdataset, 1 process"])
            curl = res.get("curl (transport only)")
            curl_mbs = nbytes / curl["seconds"] / 1e6 if curl else None
            for row, r in res.items():
                rows.append(_fmt_row(name, row, r, nbytes, wds_sps, curl_mbs))
            fb = first_batch(s["big"], env)
            print(f"  {name}: first batch {fb}", file=sys.stderr)
            summary[name] = fb

        head = (
            "| source | reader | samples/s | Mtokens/s | MB/s | vs plain webdataset 1 proc | "
            "vs curl MB/s |\n|---|---|---:|---:|---:|---:|---:|"
        )
        table = head + "\n" + "\n".join(rows)
        fb_table = (
            "| source | samples in manifest | time to first batch | peak RSS | "
            "RSS after imports (torch, numpy, wds_tools) | added by the loader |\n"
            "|---|---:|---:|---:|---:|---:|\n"
            + "\n".join(
                f"| {k} | {v['num_samples']:,} | {v['first_batch_s']:.2f} s | "
                f"{v['rss_mb']:,.0f} MB | {v['rss_imports_mb']:,.0f} MB | "
                f"{v['rss_now_mb'] - v['rss_imports_mb']:,.0f} MB |"
                for k, v in summary.items()
            )
        )
        body = (
            f"`python benchmarks/bench_stream.py --samples {args.samples} --tokens "
            f"{args.tokens} --repeat {args.repeat} --big-shards {args.big_shards}`: "
            f"{args.samples:,} samples of ~{args.tokens:,} tokens, {nbytes / 1e6:,.0f} MB of "
            f"shards, servers on 127.0.0.1 (nginx; moto S3 in its own process); best of "
            f"{args.repeat} passes; {machine()}; {time.strftime('%Y-%m-%d')}.\n\n{table}\n\n"
            f"Fresh process, synthetic manifest of {args.big_shards:,} shards x 1,000 "
            f"samples, batch 16, in-process loader:\n\n{fb_table}"
        )
        print(table)
        print()
        print(fb_table)
        if not args.no_docs:
            write_docs("bench_stream", body, args.docs)
            print(f"updated {args.docs}", file=sys.stderr)
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(www, ignore_errors=True)
        _restore_environ(saved_env)
    return 0


def _restore_environ(saved: dict) -> None:
    """Undo the AWS variables set for moto (and the S3 clients made with them): a caller in the
    same process, such as a test, must not inherit an endpoint that is gone."""
    from wds_tools import io as wio

    os.environ.clear()
    os.environ.update(saved)
    wio.reset_clients()


if __name__ == "__main__":
    sys.exit(main())
