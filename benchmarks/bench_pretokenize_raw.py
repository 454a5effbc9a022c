"""Benchmark pre-tokenizing raw image-text shards: nginx vs local files, and memory per rank.

    python benchmarks/bench_pretokenize_raw.py                     # both parts, CPU, tiny VQ
    python benchmarks/bench_pretokenize_raw.py --part speed --num_items 96 --repeats 3
    python benchmarks/bench_pretokenize_raw.py --part memory --lines 10000000 --shards 10000

**speed**: the same photos (the bundled demo, repeated to ``--num_items``) pre-tokenized three
ways in one run, interleaved and repeated: a JSON list naming local image files (today's
input), raw img2dataset-style tar shards on local disk, and the same shards served by nginx
(``http://127.0.0.1``). It prints items/s of the pipeline (``RunSummary.items_per_s``: after
start-up) and of the raw reader alone, with ratios to the local runs. The machine is shared and
noisy: read the ratios, not the absolute rates.

**memory**: peak RSS (``VmHWM``) of one rank's input side in a fresh process, at two input sizes
each: a ``--lines`` JSONL read as one file split by line (rank 0 of 8, the slow path) and as 100
files split by file, and ``--shards`` raw shards named by a brace pattern (expanded lazily; each
shard holds one small sample). Also the writer with ``increasing_keys`` (the pre-tokenizer's
setting) against a set of every key. Flat means: the larger input costs no more memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

DEMO = REPO / "lumina" / "assets" / "demo"


# --- speed ------------------------------------------------------------------------------------


def build_inputs(root: Path, num_items: int, per_shard: int) -> tuple[str, str]:
    """A JSON list naming local photos and raw shards of the same photos and captions."""
    import webdataset as wds

    items = json.loads((DEMO / "captions.json").read_text())
    items = [items[i % len(items)] for i in range(num_items)]
    (root / "items.json").write_text(json.dumps(items))
    raw = root / "www" / "raw"
    raw.mkdir(parents=True)
    num_shards = (num_items + per_shard - 1) // per_shard
    for s in range(num_shards):
        with wds.TarWriter(str(raw / f"{s:05d}.tar")) as tw:
            for j, it in enumerate(items[s * per_shard : (s + 1) * per_shard]):
                caption = it["conversations"][0]["value"].split("prompt:\n", 1)[1]
                tw.write(
                    {
                        "__key__": f"{s:05d}{j:04d}",
                        "jpg": (DEMO / it["image"][0]).read_bytes(),
                        "txt": caption,
                    }
                )
    return str(root / "items.json"), f"{{00000..{num_shards - 1:05d}}}.tar"


def run_once(args, tok: str, model: str, in_filename: str, out: Path) -> float:
    from lumina.pre_tokenize import PreTokenizeConfig, run_config

    if out.exists():
        shutil.rmtree(out)
    cfg = PreTokenizeConfig(
        in_filename=in_filename,
        out_dir=str(out),
        tokenizer=tok,
        vq_model=model,
        target_size=args.target_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        image_root=str(DEMO),
        progress=False,
        device="cpu",
    )
    s = run_config(cfg)
    assert s.num_failed == 0 and s.num_ok == args.num_items, s.line()
    return s.items_per_s


def read_once(url_pattern: str) -> tuple[float, float]:
    """Samples/s and MB/s of the raw reader alone (no decoding, no tokenizing)."""
    import braceexpand

    from lumina.raw_shards import iter_raw_items

    t0, n, nbytes = time.perf_counter(), 0, 0
    for _, s in iter_raw_items(braceexpand.braceexpand(url_pattern), 1, 0):
        n += 1
        nbytes += sum(len(v) for v in s.members.values())
    dt = time.perf_counter() - t0
    return n / dt, nbytes / dt / 1e6


def speed(args) -> None:
    from lumina.tiny import build_tiny_chameleon, build_tiny_tokenizer

    from servers import NginxServer

    root = Path(tempfile.mkdtemp(prefix="bench_raw_"))
    try:
        tok = build_tiny_tokenizer(str(root / "tokenizer"))
        model = build_tiny_chameleon(str(root / "model"), tok)
        items_json, pattern = build_inputs(root, args.num_items, args.per_shard)
        with NginxServer(str(root / "www")) as srv:
            ways = {
                "JSON list + local image files": items_json,
                "raw shards, local disk": str(root / "www" / "raw" / pattern),
                "raw shards, nginx (http://127.0.0.1)": f"{srv.url}/raw/{pattern}",
            }
            rates: dict = {k: [] for k in ways}
            reads: dict = {k: [] for k in list(ways)[1:]}
            for _ in range(args.repeats):  # interleaved, so drifts of a shared machine hit all
                for name, src in ways.items():
                    rates[name].append(run_once(args, tok, model, src, root / "out"))
                    if name in reads:
                        for _ in range(5):
                            reads[name].append(read_once(src))
        print(
            f"\nnum_items={args.num_items} per_shard={args.per_shard} target_size={args.target_size} "
            f"batch_size={args.batch_size} num_workers={args.num_workers} repeats={args.repeats} (median)\n"
        )
        print(
            "| input | pipeline items/s | ratio to JSON + files | raw reader samples/s | reader MB/s | reader ratio to local |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        base = statistics.median(rates["JSON list + local image files"])
        local_read = statistics.median(r[0] for r in reads["raw shards, local disk"])
        for name in ways:
            rate = statistics.median(rates[name])
            if name in reads:
                sps = statistics.median(r[0] for r in reads[name])
                mbs = statistics.median(r[1] for r in reads[name])
                tail = f"{sps:.0f} | {mbs:.1f} | {sps / local_read:.2f}x"
            else:
                tail = " | | "
            print(f"| {name} | {rate:.2f} | {rate / base:.2f}x | {tail} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- memory -----------------------------------------------------------------------------------

PROBE = r"""
import sys, json
sys.path.insert(0, {repo!r})
mode, arg = sys.argv[1], sys.argv[2]
n = 0
if mode in ("jsonl_by_line", "jsonl_by_file", "raw"):
    from lumina.input_items import InputSpec, iter_inputs
    spec = InputSpec(arg)
    splits = 8 if mode == "jsonl_by_line" else 1
    for _ in iter_inputs(spec, splits, 0):
        n += 1
else:  # writer: arg = number of samples
    import numpy as np, tempfile
    from wds_tools.writer import ShardWriter
    ids = np.arange(16, dtype=np.int64)
    with tempfile.TemporaryDirectory() as d:
        with ShardWriter(d, vocab_size=65536, max_samples=10000, max_bytes=1 << 30,
                         increasing_keys=(mode == "writer_increasing")) as w:
            for i in range(int(arg)):
                w.write(f"{{i:015d}}", ids)
                n += 1
                if i % 10000 == 9999:  # keep the disk small: the shards are not the point
                    for p in __import__("glob").glob(d + "/*.tar"):
                        open(p, "w").close()
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({{"items": n, "peak_rss_mb": int(hwm) / 1024}}))
"""


def probe(mode: str, arg: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(repo=str(REPO)), mode, arg],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_jsonl(root: Path, lines: int, files: int) -> tuple[str, str]:
    """One file of ``lines`` lines, and the same lines in ``files`` files."""
    line = '{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}\n'
    one = root / f"one-{lines}.jsonl"
    with open(one, "w") as f:
        chunk = line * 10000
        for _ in range(lines // 10000):
            f.write(chunk)
    per = lines // files
    parts = root / f"parts-{lines}"
    parts.mkdir()
    step = min(per, 10000)
    for k in range(files):
        with open(parts / f"{k:03d}.jsonl", "w") as f:
            for _ in range(per // step):
                f.write(line * step)
    return str(one), str(parts / f"{{000..{files - 1:03d}}}.jsonl")


def write_shards(root: Path, n: int) -> str:
    """``n`` tiny raw shards (one sample each) named by a brace pattern."""
    import io

    import webdataset as wds
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 30, 200)).save(buf, format="JPEG")
    folder = root / f"shards-{n}"
    folder.mkdir()
    for s in range(n):
        with wds.TarWriter(str(folder / f"{s:05d}.tar")) as tw:
            tw.write({"__key__": f"{s:05d}0000", "jpg": buf.getvalue(), "txt": "a small purple square"})
    return str(folder / f"{{00000..{n - 1:05d}}}.tar")


def memory(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench_mem_"))
    rows = []
    try:
        small = max(args.lines // 10, 10000)
        for lines in (small, args.lines):
            one, parts = write_jsonl(root, lines, 100)
            rows.append(("JSONL, one file split by line (rank 0 of 8)", lines, probe("jsonl_by_line", one)))
            rows.append(
                (
                    "JSONL, 100 files split by file (all of them, one rank)",
                    lines,
                    probe("jsonl_by_file", parts),
                )
            )
            os.remove(one)
            shutil.rmtree(Path(parts).parent)
        for n in (max(args.shards // 10, 10), args.shards):
            rows.append(("raw shards by brace pattern (one rank)", n, probe("raw", write_shards(root, n))))
        for n in (args.writer_samples // 10, args.writer_samples):
            rows.append(
                ("ShardWriter, increasing_keys (pre-tokenizer)", n, probe("writer_increasing", str(n)))
            )
        rows.append(
            (
                "ShardWriter, set of keys (default)",
                args.writer_samples,
                probe("writer_set", str(args.writer_samples)),
            )
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n| input side of one rank | input size | items seen | peak RSS MB |")
    print("|---|---:|---:|---:|")
    for name, size, r in rows:
        print(f"| {name} | {size:,} | {r['items']:,} | {r['peak_rss_mb']:.0f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["speed", "memory", "both"], default="both")
    p.add_argument("--num_items", type=int, default=48, help="photos pre-tokenized per run (speed)")
    p.add_argument("--per_shard", type=int, default=8, help="samples per raw shard (speed)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved repeats of each way (speed)")
    p.add_argument("--target_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument(
        "--num_workers", type=int, default=0, help="0 = decode inline (less noise on a shared machine)"
    )
    p.add_argument("--lines", type=int, default=10_000_000, help="JSONL lines (memory)")
    p.add_argument("--shards", type=int, default=10_000, help="raw shards (memory)")
    p.add_argument("--writer_samples", type=int, default=1_000_000, help="samples written (memory)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.part in ("speed", "both"):
        speed(args)
    if args.part in ("memory", "both"):
        memory(args)


if __name__ == "__main__":
    main()
