"""``wds-tools verify MANIFEST``: re-read every shard and check it against its index.

Checks per shard: it exists, its size and sha256 match, the tar walks cleanly, sample keys,
offsets, lengths, token and supervised counts match the index, each sample decodes through the
indexed path with every check on, token ids are inside the vocabulary, keys are unique. Exits 1
with the list of problems, 0 when everything holds.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

import numpy as np
from tqdm import tqdm

from . import io as wio
from .cli_options import add_io_arguments, io_options_from_args
from .contract import sha256_bytes
from .format import FormatError, decode_sample
from .reader import Shard, _read_doc, _shard_sources, iter_tar

__all__ = ["verify_shard", "verify", "add_arguments", "run"]


def verify_shard(sh: Shard, vocab_size: int) -> List[str]:
    """Every problem found in one shard (empty list: the shard is good)."""
    where = sh.where
    try:
        data = wio.read_bytes(sh.url, sh.opts)
    except (OSError, ValueError) as e:
        return [f"{where}: cannot read: {wio.scrub(str(e))}"]
    problems = []
    size, digest = sh.index.get("bytes"), sh.index.get("sha256")
    if size is None:
        problems.append(f"{where}: index has no 'bytes' (the shard's size)")
    elif len(data) != size:
        problems.append(f"{where}: {len(data)} bytes, index says {size}")
    if digest is None:
        problems.append(f"{where}: index has no 'sha256'")
    elif sha256_bytes(data) != digest:
        problems.append(f"{where}: sha256 mismatch (corrupt or modified shard)")
    try:
        walked = list(iter_tar(sh.url, sh.opts, data=data))
    except (FormatError, OSError, ValueError) as e:
        problems.append(f"{where}: tar walk failed: {e}")
        walked = []
    if walked and len(walked) != len(sh):
        problems.append(f"{where}: tar holds {len(walked)} samples, index says {len(sh)}")
    for i, t in enumerate(walked[: len(sh)]):
        exp = (sh.keys[i], sh.offsets[i], sh.lengths[i], sh.num_tokens[i], sh.num_supervised[i])
        got = (t["__key__"], t["__offset__"], t["__length__"], int(t["input_ids"].size), t["num_supervised"])
        if got != exp:
            problems.append(
                f"{where}: sample {i} is (key, offset, length, tokens, supervised)="
                f"{got} in the tar but {exp} in the index"
            )
    for i in range(len(sh)):
        try:
            s = decode_sample(
                data, sh.offsets[i], sh.lengths[i], sh.keys[i], sh.num_tokens[i], sh.dtype, where, check=True
            )
        except FormatError as e:
            problems.append(str(e))
            continue
        if s["input_ids"].size and int(s["input_ids"].max()) >= vocab_size:
            problems.append(
                f"{where}: sample {sh.keys[i]!r}: token id {int(s['input_ids'].max())} "
                f">= vocab_size {vocab_size}"
            )
    return problems


def verify(path: str, progress: bool = False, opts: wio.IOOptions = wio.DEFAULT) -> Dict[str, Any]:
    """Check every shard named by ``path``; a shard that cannot be opened (missing index or
    tar, unreadable index) is a problem of the report, not an exception."""
    problems: List[str] = []
    seen: Dict[str, str] = {}
    manifest = _read_doc(path, opts) if path.endswith(".json") else {}
    manifest = manifest if isinstance(manifest, dict) else {}
    entries = manifest.get("shards") if manifest.get("kind") == "manifest" else None
    shards = []
    for k, opener in enumerate(_shard_sources(path, opts, None)):
        try:
            sh = opener()
        except (FormatError, OSError, ValueError) as e:
            problems.append(f"{wio.redact(getattr(opener, 'url', path))}: cannot open: {wio.scrub(str(e))}")
            continue
        shards.append(sh)
        if entries is not None:
            entry = entries[k]
            if entry.get("sha256") != sh.index.get("sha256") or entry.get("bytes") != sh.index.get("bytes"):
                problems.append(f"{sh.where}: manifest entry disagrees with the shard index")
            if entry.get("num_samples") != sh.index["num_samples"]:
                problems.append(
                    f"{sh.where}: manifest entry says {entry.get('num_samples')} "
                    f"samples, the shard index {sh.index['num_samples']}"
                )
    if entries is not None:
        n = sum(sh.index["num_samples"] for sh in shards)
        if n != manifest.get("num_samples"):
            problems.append(
                f"{path}: manifest says {manifest.get('num_samples')} samples, readable shards hold {n}"
            )
    for sh in tqdm(shards, desc="verify", unit="shard", disable=not progress):
        problems += verify_shard(sh, int(sh.index.get("vocab_size") or np.iinfo(sh.dtype).max + 1))
        for k in sh.keys:
            if k in seen:
                problems.append(f"duplicate key {k!r} in {sh.where} and {seen[k]}")
            seen[k] = sh.where
    n_shards = len(entries) if entries is not None else len(shards)
    return {"shards": n_shards, "samples": len(seen), "ok": not problems, "problems": problems}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="manifest (index.json), shard index or shard; local or remote")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_io_arguments(p)


def run(args: argparse.Namespace) -> int:
    report = verify(args.path, progress=sys.stderr.isatty(), opts=io_options_from_args(args))
    if args.json:
        print(json.dumps(report))
    elif report["ok"]:
        print(f"ok: {report['shards']} shards, {report['samples']} samples verified")
    else:
        print(f"FAILED: {len(report['problems'])} problems in {report['shards']} shards:")
        for p in report["problems"]:
            print(f"  - {p}")
    return 0 if report["ok"] else 1
