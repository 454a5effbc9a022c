#!/usr/bin/env python
"""Single-process read throughput: this reader vs plain webdataset vs the mmap limit.

Writes a dataset of ``--samples`` samples of about ``--tokens`` tokens (uint16), then reads it
all, in one run, with:

- ``wds_tools``: ``wds_tools.reader.iter_samples(manifest)`` (ids, labels, meta per sample);
- ``webdataset``: plain ``webdataset.WebDataset(shards).decode()`` (ids and JSON per sample);
- ``lean``: the loader's hot path (one ranged read per block of 256 samples, then
  ``Shard.decode_block``: ids views + supervised spans, labels left to collation);
- ``mmap limit``: ``numpy.frombuffer`` over an mmap of each tar at offsets precomputed from the
  index (no parsing, no labels: the ceiling for any Python reader of these files).

Each row is the best of ``--repeat`` passes (the files are in the page cache after the first
write, so this measures CPU, not disk). Prints a table and, with ``--docs``, replaces the
``bench_reader`` table in ``docs/benchmarks.md``.

    python benchmarks/bench_reader.py                 # 20,000 samples x ~2,400 tokens
    python benchmarks/bench_reader.py --samples 500 --repeat 1 --no-docs   # smoke
    python benchmarks/bench_reader.py --profile 20 --no-docs   # + where iter_samples spends

Instruction counts (independent of the machine's load): ``--passes N --dir FOLDER`` only reads
the dataset already in ``FOLDER`` N times with ``iter_samples``, touching ids and labels as a
training step does; under ``valgrind --tool=callgrind`` the difference between N=2 and N=1,
divided by the samples, is one pass's instructions per sample (``docs/benchmarks.md``).
"""

from __future__ import annotations

import argparse
import glob
import mmap
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from typing import Callable, Dict, Iterable, List, Optional

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs", "benchmarks.md")


def make_dataset(
    out_dir: str,
    num_samples: int,
    tokens: int,
    samples_per_shard: int = 1000,
    seed: int = 0,
    key_prefix: str = "s",
) -> str:
    """A dataset of ``num_samples`` samples of ``tokens`` +- 10% tokens; returns its manifest."""
    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, vocab_size=65536, max_samples=samples_per_shard, tokenizer="bench") as w:
        for i in range(num_samples):
            n = int(rng.integers(int(tokens * 0.9), int(tokens * 1.1) + 1))
            mask = np.zeros(n, bool)
            mask[n // 4 :] = True
            w.write(
                f"{key_prefix}{i:09d}", rng.integers(0, 65536, n), mask=mask, meta={"source": "bench", "i": i}
            )
    merge(out_dir, verify_checksums=False)
    return os.path.join(out_dir, "index.json")


def dataset_bytes(folder: str) -> int:
    return sum(os.path.getsize(p) for p in glob.glob(os.path.join(folder, "*.tar")))


def measure(fn: Callable[[], Iterable], repeat: int) -> Dict[str, float]:
    """Best of ``repeat`` full passes: samples, tokens, seconds."""
    best = None
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = tok = 0
        for ids in fn():
            n += 1
            tok += ids.size
        dt = time.perf_counter() - t0
        if best is None or dt < best["seconds"]:
            best = {"samples": n, "tokens": tok, "seconds": dt}
    return best


def wds_tools_pass(manifest: str):
    from wds_tools.reader import iter_samples

    return lambda: (s["input_ids"] for s in iter_samples(manifest))


def webdataset_pass(folder: str):
    import webdataset as wds

    shards = sorted(glob.glob(os.path.join(folder, "*.tar")))
    return lambda: (
        s["input_ids.npy"] for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode()
    )


def lean_pass(manifest: str, block: int = 256):
    """The loader's hot path: one ranged read per block of samples, then its block decode
    (``Shard.decode_block``: ids views + supervised spans; labels are built later, into the
    padded batch)."""
    from wds_tools import io as wio
    from wds_tools.reader import open_shards

    shards = open_shards(manifest)  # the indexes are read once, as the loader caches them

    def run():
        for sh in shards:
            for a in range(0, len(sh), block):
                b = min(a + block, len(sh))
                base, end = sh.offsets[a], sh.offsets[b - 1] + sh.lengths[b - 1]
                with wio.open_range(sh.url, base, end) as f:
                    buf = f.read(end - base)
                yield from sh.decode_block(buf, base, a, b)[0]

    return run


def mmap_pass(manifest: str):
    from wds_tools.reader import open_shards

    plan = []
    for sh in open_shards(manifest):
        with open(sh.url, "rb") as f:  # the npy header length of each sample, read once
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offs = [o + 512 + 10 + (m[o + 520] | (m[o + 521] << 8)) for o in sh.offsets]
        plan.append((sh.url, sh.dtype, offs, sh.num_tokens))

    def run():
        for url, dtype, offs, ntoks in plan:
            with open(url, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            for off, nt in zip(offs, ntoks):
                yield np.frombuffer(m, dtype=dtype, count=nt, offset=off)

    return run


def profile_pass(manifest: str, top: int) -> str:
    """cProfile of one ``iter_samples`` pass that touches what a training step needs (ids and
    labels): the ``top`` functions by own time. Profiling inflates per-call costs, so read it
    for shares, not speed."""
    import cProfile
    import io
    import pstats

    from wds_tools.reader import iter_samples

    def run() -> None:
        for s in iter_samples(manifest):
            s["input_ids"], s["labels"]

    run()  # page cache and imports warm
    prof = cProfile.Profile()
    prof.runcall(run)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def read_passes(manifest: str, passes: int) -> int:
    """``passes`` passes of ``iter_samples`` over ``manifest``, each sample's ids and labels
    taken as the anchor benchmark takes them; prints samples/s per pass."""
    from wds_tools.reader import iter_samples

    for _ in range(passes):
        t0 = time.perf_counter()
        n = tok = 0
        for s in iter_samples(manifest):
            ids, _labels = s["input_ids"], s["labels"]
            n += 1
            tok += ids.shape[0]
        print(f"{n:,} samples, {n / (time.perf_counter() - t0):,.0f} samples/s", file=sys.stderr)
    return 0


def format_table(rows: List[Dict], nbytes: int, base: str) -> str:
    ref = next(r for r in rows if r["name"] == base)
    lines = ["| reader | samples/s | Mtokens/s | MB/s | vs plain webdataset |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        sps = r["samples"] / r["seconds"]
        lines.append(
            f"| {r['name']} | {sps:,.0f} | {r['tokens'] / r['seconds'] / 1e6:,.1f} | "
            f"{nbytes / r['seconds'] / 1e6:,.0f} | "
            f"{sps / (ref['samples'] / ref['seconds']):.1f}x |"
        )
    return "\n".join(lines)


def machine() -> str:
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"numpy {np.__version__}"
    )


def write_docs(section: str, body: str, path: str = DOCS) -> None:
    """Replace the text between ``<!-- SECTION:begin -->`` and ``<!-- SECTION:end -->``."""
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=20_000, help="samples to write and read")
    p.add_argument("--tokens", type=int, default=2_400, help="mean tokens per sample")
    p.add_argument("--repeat", type=int, default=5, help="passes per reader; the best counts")
    p.add_argument("--dir", default=None, help="dataset folder (default: a temp folder, removed)")
    p.add_argument("--docs", default=DOCS, help="markdown file to update")
    p.add_argument("--no-docs", action="store_true", help="print only")
    p.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also print the N functions iter_samples spends most time in (cProfile)",
    )
    p.add_argument(
        "--passes",
        type=int,
        default=0,
        metavar="N",
        help="only read the dataset in --dir N times with iter_samples (for instruction counts)",
    )
    args = p.parse_args(argv)
    if args.passes:
        if not args.dir:
            p.error("--passes needs --dir (a dataset written by an earlier run)")
        return read_passes(os.path.join(args.dir, "index.json"), args.passes)

    tmp = None
    folder = args.dir
    if folder is None:
        tmp = folder = tempfile.mkdtemp(prefix="bench_reader_")
    try:
        manifest = os.path.join(folder, "index.json")
        if not os.path.exists(manifest):
            print(f"writing {args.samples:,} samples of ~{args.tokens:,} tokens to {folder}", file=sys.stderr)
            make_dataset(folder, args.samples, args.tokens)
        nbytes = dataset_bytes(folder)
        rows = []
        for name, fn in (
            ("plain webdataset `WebDataset(...).decode()`", webdataset_pass(folder)),
            ("wds_tools `iter_samples` (ids + labels + meta)", wds_tools_pass(manifest)),
            ("wds_tools loader hot path: block reads + block decode (ids + spans)", lean_pass(manifest)),
            ("mmap + `np.frombuffer` at indexed offsets (limit)", mmap_pass(manifest)),
        ):
            r = measure(fn, args.repeat)
            r["name"] = name
            rows.append(r)
            print(f"  {name}: {r['samples'] / r['seconds']:,.0f} samples/s", file=sys.stderr)
        table = format_table(rows, nbytes, rows[0]["name"])
        if args.profile:
            print(profile_pass(manifest, args.profile), file=sys.stderr)
        n = rows[0]["samples"]
        body = (
            f"`python benchmarks/bench_reader.py --samples {args.samples} --tokens "
            f"{args.tokens} --repeat {args.repeat}`: {n:,} samples, "
            f"{rows[0]['tokens'] / n:,.0f} tokens each on average, {nbytes / 1e6:,.0f} MB of "
            f"shards in the page cache; single process, best of {args.repeat} passes; "
            f"{machine()}; {time.strftime('%Y-%m-%d')}.\n\n{table}"
        )
        print(table)
        if not args.no_docs:
            write_docs("bench_reader", body, args.docs)
            print(f"updated {args.docs}", file=sys.stderr)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
