"""Merge the shard indexes of all ranks into one dataset manifest (``index.json``).

Refuses an incomplete set, naming what is wrong: a temp shard left by an interrupted writer, a
shard without its index or an index without its shard, a size or checksum mismatch, a rank
that did not finish, keys that appear twice, shards that disagree on dtype or tokenizer.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional

from tqdm import tqdm

from .format import FORMAT_NAME, FORMAT_VERSION, FormatError, check_version
from .writer import write_json_atomic

__all__ = ["merge", "MergeError", "sha256_file"]


class MergeError(FormatError):
    """The shard set cannot be merged; ``problems`` lists every reason."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"cannot merge: {problems[0]}{more}")


def sha256_file(path: str, bufsize: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(bufsize)
            if not b:
                return h.hexdigest()
            h.update(b)


def _scan(root: str):
    indexes, tars, tmps, markers = [], set(), [], []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for fn in sorted(files):
            p = os.path.join(d, fn)
            if fn.endswith(".idx.json"):
                indexes.append(p)
            elif fn.endswith(".tar"):
                tars.add(p)
            elif fn.endswith(".tmp"):
                tmps.append(p)
            elif fn.endswith(".done.json"):
                markers.append(p)
    return indexes, tars, tmps, markers


def _load(path: str, problems: List[str], kind: Optional[str] = None) -> Optional[Dict[str, Any]]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        check_version(doc, path)
        if kind == "shard_index":
            from .reader import _check_index
            _check_index(doc, path)
            shard = doc.get("shard")
            if (not isinstance(shard, str) or not shard.endswith(".tar") or "/" in shard
                    or "\\" in shard or shard.startswith(".")):
                raise FormatError(f"{path}: 'shard' must be the file name of a .tar beside the "
                                  f"index, got {str(shard)[:80]!r}")
            for k in ("bytes", "num_tokens", "num_supervised"):
                if type(doc.get(k)) is not int or doc[k] < 0:
                    raise FormatError(f"{path}: {k!r} must be a non-negative integer")
            if not isinstance(doc.get("sha256"), str):
                raise FormatError(f"{path}: 'sha256' must be a hex digest string")
        elif kind == "rank_done":
            for k in ("prefix", "rank", "world_size", "num_shards", "num_samples"):
                if k not in doc:
                    raise FormatError(f"{path}: done-marker lacks {k!r}")
        return doc
    except (ValueError, OSError) as e:
        problems.append(f"{path}: unreadable ({' '.join(str(e).split())})")
        return None


def merge(root: str, save_path: Optional[str] = None, *, verify_checksums: bool = True,
          allow_incomplete: bool = False, progress: bool = False) -> Dict[str, Any]:
    """Build (and write, if ``save_path``) the manifest of every shard under ``root``.

    ``allow_incomplete`` merges what is complete and lists the rest under ``"incomplete"``
    instead of refusing.
    """
    save_path = save_path or os.path.join(root, "index.json")
    base = os.path.dirname(os.path.abspath(save_path))
    indexes, tars, tmps, marker_paths = _scan(root)
    problems = [f"{p}: incomplete shard left by an interrupted writer (rerun that rank with "
                "resume to redo it)" for p in tmps]
    loaded = [(p, _load(p, problems, "shard_index")) for p in indexes]
    indexes = [p for p, d in loaded if d is not None]
    docs = [d for _, d in loaded if d is not None]
    if not docs and not problems:
        raise MergeError([f"{root}: no shard indexes (*.idx.json) found"])
    shards, seen_keys, ident = [], {}, None
    named = set()
    it = tqdm(zip(indexes, docs), total=len(docs), desc="merge", disable=not progress, unit="shard")
    for ipath, idx in it:
        tar = os.path.join(os.path.dirname(ipath), idx["shard"])
        named.add(tar)
        if not os.path.exists(tar):
            problems.append(f"{tar}: shard missing (named by {ipath})")
            continue
        size = os.path.getsize(tar)
        if size != idx["bytes"]:
            problems.append(f"{tar}: {size} bytes, its index says {idx['bytes']} (truncated or "
                            "overwritten)")
            continue
        if verify_checksums and sha256_file(tar) != idx["sha256"]:
            problems.append(f"{tar}: sha256 mismatch with its index (corrupt shard)")
            continue
        this = (idx["dtype"], idx["vocab_size"], json.dumps(idx.get("tokenizer"), sort_keys=True))
        if ident is None:
            ident = this
        elif this != ident:
            problems.append(f"{tar}: dtype/vocab_size/tokenizer {this} differ from other shards' "
                            f"{ident}")
            continue
        for k in idx["samples"]["key"]:
            if k in seen_keys:
                problems.append(f"duplicate key {k!r} in {tar} and {seen_keys[k]}")
                break
            seen_keys[k] = tar
        if os.path.relpath(tar, base).startswith(".."):
            problems.append(f"{tar}: outside the folder of the manifest {save_path} (readers "
                            "refuse manifest entries that leave its folder: save the manifest "
                            "in the dataset folder)")
            continue
        shards.append({"path": os.path.relpath(tar, base),
                       "index": os.path.relpath(ipath, base),
                       "rank": idx.get("rank", 0), "shard_id": idx.get("shard_id", 0),
                       "num_samples": idx["num_samples"], "num_tokens": idx["num_tokens"],
                       "num_supervised": idx["num_supervised"], "bytes": idx["bytes"],
                       "sha256": idx["sha256"]})
    for t in sorted(tars - named):
        problems.append(f"{t}: shard without an index (the writer stopped before finishing it)")
    ranks = _check_ranks(docs, marker_paths, problems)
    if problems and not allow_incomplete:
        raise MergeError(problems)
    shards.sort(key=lambda s: (s["rank"], s["shard_id"], s["path"]))
    manifest = {
        "format": FORMAT_NAME, "version": FORMAT_VERSION, "kind": "manifest",
        "dtype": ident[0] if ident else None, "vocab_size": ident[1] if ident else None,
        "tokenizer": docs[0].get("tokenizer") if docs else None,
        "num_shards": len(shards),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_supervised": sum(s["num_supervised"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "num_failed": sum(int(r.get("extra", {}).get("num_failed", 0)) for r in ranks),
        "ranks": ranks, "shards": shards,
    }
    if problems:
        manifest["incomplete"] = problems
    write_json_atomic(save_path, manifest)
    return manifest


def _check_ranks(docs, marker_paths, problems) -> List[Dict[str, Any]]:
    markers = {}
    for p in marker_paths:
        m = _load(p, problems, "rank_done")
        if m is not None:
            markers[(m["prefix"], m["rank"])] = m
    expected = {}
    for idx in docs:
        prefix = idx["shard"].rsplit("-r", 1)[0]
        expected.setdefault(prefix, {"world_size": idx.get("world_size", 1), "ranks": set()})
        expected[prefix]["ranks"].add(idx.get("rank", 0))
    for (prefix, _), m in markers.items():
        expected.setdefault(prefix, {"world_size": m["world_size"], "ranks": set()})
    for prefix, e in sorted(expected.items()):
        for r in range(e["world_size"]):
            if (prefix, r) not in markers:
                why = "wrote shards but did not finish" if r in e["ranks"] else "has no output"
                problems.append(f"rank {r} of {e['world_size']} ({prefix!r}) {why}: no "
                                f"{prefix}-r{r:05d}.done.json (rerun that rank)")
    return [{"prefix": m["prefix"], "rank": m["rank"], "num_shards": m["num_shards"],
             "num_samples": m["num_samples"], "extra": m.get("extra", {})}
            for _, m in sorted(markers.items())]
