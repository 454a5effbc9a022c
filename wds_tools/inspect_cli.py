"""``wds-tools inspect PATH_OR_URL``: a table of the samples of a shard, index or manifest.

``--key K`` shows one sample (decoded to text with ``--tokenizer DIR``, image blocks shown as
``<image WxH: N tokens>``); ``--json`` prints machine-readable output; ``--dump [FILE]`` writes
every sample as one JSON line (key, input_ids, labels, meta) for diffing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .format import IGNORE_INDEX
from .reader import Shard, open_shards

__all__ = ["add_arguments", "run", "sample_rows", "render_sample"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "path",
        help="shard (.tar), shard index (.idx.json) or manifest (index.json); "
        "local path, http(s):// or s3://",
    )
    p.add_argument("--key", help="show this one sample in detail")
    p.add_argument("--tokenizer", help="tokenizer folder (or tokenizer.json) to decode tokens to text")
    p.add_argument(
        "--limit",
        type=int,
        default=50,
        help="rows in the sample table (0: all; totals always cover everything)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--dump",
        nargs="?",
        const="-",
        metavar="FILE",
        help="write every sample as a JSON line (key, input_ids, labels, meta) to FILE or stdout",
    )


def _image_desc(meta: Dict[str, Any]) -> List[str]:
    return [f"{im.get('w', '?')}x{im.get('h', '?')}" for im in meta.get("images", []) or []]


def sample_rows(shards: List[Shard]) -> Iterator[Dict[str, Any]]:
    """One row per sample, from the indexes plus each sample's metadata."""
    for sh in shards:
        for s in sh.iter():
            yield {
                "key": s["__key__"],
                "shard": os.path.basename(sh.url),
                "tokens": int(s["input_ids"].size),
                "supervised": int((s["labels"] != IGNORE_INDEX).sum()),
                "images": _image_desc(s["meta"]),
                "meta": s["meta"],
            }


def _load_tokenizer(path: Optional[str]):
    if not path:
        return None
    from tokenizers import Tokenizer  # lazy: only --tokenizer needs it

    f = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.exists(f):
        raise ValueError(f"--tokenizer {path}: no tokenizer.json there")
    return Tokenizer.from_file(f)


def _segments(ids, labels, meta) -> List[Tuple[str, int, int]]:
    """Split positions into (kind, start, end): 'image' blocks, then runs of train/ctx."""
    n = len(ids)
    images = sorted(
        (im["offset"], im["offset"] + im["num_tokens"], im)
        for im in meta.get("images", []) or []
        if "offset" in im and "num_tokens" in im
    )
    out, pos = [], 0
    for s, e, _ in images + [(n, n, None)]:
        while pos < s:
            train = labels[pos] != IGNORE_INDEX
            end = pos
            while end < s and (labels[end] != IGNORE_INDEX) == train:
                end += 1
            out.append(("train" if train else "ctx", pos, end))
            pos = end
        if s < e:
            out.append(("image-train" if labels[s] != IGNORE_INDEX else "image", s, e))
            pos = e
    return out


def render_sample(s: Dict[str, Any], tokenizer=None) -> str:
    ids, labels, meta = s["input_ids"].tolist(), s["labels"].tolist(), s["meta"]
    lines = [
        f"key: {s['__key__']}   tokens: {len(ids)}   supervised: "
        f"{sum(1 for x in labels if x != IGNORE_INDEX)}",
        f"meta: {json.dumps(meta, ensure_ascii=False)}",
        "segments ([train] = trained on):",
    ]
    images = {im["offset"]: im for im in meta.get("images", []) or [] if "offset" in im}
    for kind, a, b in _segments(ids, labels, meta):
        tag = "[train]" if kind.endswith("train") else "[ctx]  "
        if kind.startswith("image"):
            im = images[a]
            text = f"<image {im.get('w', '?')}x{im.get('h', '?')}: {b - a} tokens>"
        elif tokenizer is not None:
            text = repr(tokenizer.decode(ids[a:b], skip_special_tokens=False))
        else:
            text = " ".join(map(str, ids[a:b]))
        lines.append(f"  {tag} {a:>6}-{b:<6} {text}")
    return "\n".join(lines)


def _find(shards: List[Shard], key: str) -> Dict[str, Any]:
    for sh in shards:
        if key in sh.keys:
            return sh.read(sh.keys.index(key))
    raise ValueError(f"no sample with key {key!r}")


def run(args: argparse.Namespace) -> int:
    shards = open_shards(args.path)
    if args.key:
        s = _find(shards, args.key)
        if args.json:
            print(json.dumps(_sample_json(s), ensure_ascii=False))
        else:
            print(render_sample(s, _load_tokenizer(args.tokenizer)))
        return 0
    if args.dump:
        out = sys.stdout if args.dump == "-" else open(args.dump, "w")
        try:
            for sh in shards:
                for s in sh.iter():
                    out.write(json.dumps(_sample_json(s), ensure_ascii=False) + "\n")
        finally:
            if out is not sys.stdout:
                out.close()
        return 0
    rows: List[Dict[str, Any]] = []
    totals: Dict[str, Any] = {"shards": len(shards), "samples": 0, "tokens": 0, "supervised": 0, "images": 0}
    for r in sample_rows(shards):
        totals["samples"] += 1
        totals["tokens"] += r["tokens"]
        totals["supervised"] += r["supervised"]
        totals["images"] += len(r["images"])
        if args.limit == 0 or len(rows) < args.limit:
            rows.append(r)
    totals["bytes"] = sum(sh.index["bytes"] for sh in shards)
    totals["bytes_per_token"] = round(totals["bytes"] / max(totals["tokens"], 1), 3)
    if args.json:
        print(json.dumps({"totals": totals, "samples": rows}, ensure_ascii=False))
        return 0
    print(f"{'key':<24} {'tokens':>7} {'superv.':>7}  {'images':<20} shard")
    for r in rows:
        print(
            f"{r['key']:<24} {r['tokens']:>7} {r['supervised']:>7}  "
            f"{','.join(r['images']) or '-':<20} {r['shard']}"
        )
    if totals["samples"] > len(rows):
        print(f"... {totals['samples'] - len(rows)} more samples (--limit 0 shows all)")
    print(
        f"total: {totals['shards']} shards, {totals['samples']} samples, {totals['tokens']} tokens "
        f"({totals['supervised']} supervised), {totals['images']} images, {totals['bytes']} bytes "
        f"({totals['bytes_per_token']} B/token)"
    )
    return 0


def _sample_json(s: Dict[str, Any]) -> Dict[str, Any]:
    return {
        "key": s["__key__"],
        "input_ids": s["input_ids"].tolist(),
        "labels": s["labels"].tolist(),
        "meta": s["meta"],
    }
