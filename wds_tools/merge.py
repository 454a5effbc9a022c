"""Merge the shard indexes of all ranks into one dataset manifest (``index.json``).

Refuses an incomplete set, naming what is wrong: a temp shard left by an interrupted writer, a
shard without its index or an index without its shard, a size or checksum mismatch, a rank
that did not finish, keys that appear twice, shards that disagree on dtype or tokenizer.

``root`` may be an ``s3://`` prefix (or a local folder written through a store): the listing
gives names and sizes, indexes are read through the transport, checksums re-hash each shard as
a stream, and the manifest is put last, in one atomic write.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Any, Dict, List, Optional

from tqdm import tqdm

from . import io as wio
from .contract import check_index, is_count, sha256_file, sha256_url, write_json_atomic
from .format import FORMAT_NAME, FORMAT_VERSION, FormatError, check_version

__all__ = ["merge", "MergeError"]


class MergeError(FormatError):
    """The shard set cannot be merged; ``problems`` lists every reason."""

    def __init__(self, problems: List[str]):
        self.problems = problems
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        super().__init__(f"cannot merge: {problems[0]}{more}")


class _LocalTree:
    """File access of a local dataset folder (paths are OS paths)."""

    def __init__(self, root: str):
        self.root = root

    def files(self):
        for d, dirs, files in os.walk(self.root):
            dirs.sort()
            for fn in sorted(files):
                yield os.path.join(d, fn)

    def sibling(self, path: str, name: str) -> str:
        return os.path.join(os.path.dirname(path), name)

    def size(self, path: str) -> Optional[int]:
        return os.path.getsize(path) if os.path.exists(path) else None

    def read_json(self, path: str) -> Any:
        with open(path, encoding="utf-8") as f:
            return json.load(f)

    def sha256(self, path: str) -> str:
        return sha256_file(path)

    def base(self, save_path: str) -> str:
        return os.path.dirname(os.path.abspath(save_path))

    def relpath(self, path: str, base: str) -> str:
        return os.path.relpath(path, base)

    def save(self, save_path: str, doc: Dict[str, Any]) -> None:
        write_json_atomic(save_path, doc)


class _StoreTree:
    """File access of a dataset under an object-store prefix (paths are URLs); one listing."""

    def __init__(self, root: str):
        from .store import open_store

        self.store = open_store(root)
        self.sizes = {self.store.url_of(n): size for n, size in self.store.list("")}

    def files(self):
        return iter(sorted(self.sizes))

    def sibling(self, path: str, name: str) -> str:
        return wio.join_url(path, name)

    def size(self, path: str) -> Optional[int]:
        return self.sizes.get(path)

    def read_json(self, path: str) -> Any:
        return wio.read_json(path)

    def sha256(self, path: str) -> str:
        return sha256_url(path)[0]

    def base(self, save_path: str) -> str:
        return posixpath.dirname(save_path)

    def relpath(self, path: str, base: str) -> str:
        return posixpath.relpath(path.split("://", 1)[1], base.split("://", 1)[1])

    def save(self, save_path: str, doc: Dict[str, Any]) -> None:
        rel = self.relpath(save_path, self.store.url)
        if rel.startswith(".."):
            raise MergeError(
                [
                    f"{wio.redact(save_path)}: the manifest of an object-store dataset "
                    f"goes inside its prefix {wio.redact(self.store.url)}"
                ]
            )
        self.store.put_bytes(json.dumps(doc, separators=(",", ":")).encode(), rel)


def _scan(tree):
    indexes, tars, tmps, markers = [], set(), [], []
    for p in tree.files():
        fn = p.rsplit("/", 1)[-1]
        if fn.endswith(".idx.json"):
            indexes.append(p)
        elif fn.endswith(".tar"):
            tars.add(p)
        elif fn.endswith(".tmp"):
            tmps.append(p)
        elif fn.endswith(".done.json"):
            markers.append(p)
    return indexes, tars, tmps, markers


def _load(tree, path: str, problems: List[str], kind: Optional[str] = None) -> Optional[Dict[str, Any]]:
    try:
        doc = tree.read_json(path)
        check_version(doc, wio.redact(path))
        if kind == "shard_index":
            check_index(doc, path, checksums=True)
            shard = doc.get("shard")
            if (
                not isinstance(shard, str)
                or not shard.endswith(".tar")
                or "/" in shard
                or "\\" in shard
                or shard.startswith(".")
            ):
                raise FormatError(
                    f"{path}: 'shard' must be the file name of a .tar beside the "
                    f"index, got {str(shard)[:80]!r}"
                )
            for k in ("num_tokens", "num_supervised"):
                if not is_count(doc.get(k)):
                    raise FormatError(f"{path}: {k!r} must be a non-negative integer")
        elif kind == "rank_done":
            for k in ("prefix", "rank", "world_size", "num_shards", "num_samples"):
                if k not in doc:
                    raise FormatError(f"{path}: done-marker lacks {k!r}")
        return doc
    except (ValueError, OSError) as e:
        problems.append(f"{wio.redact(path)}: unreadable ({' '.join(wio.scrub(str(e)).split())})")
        return None


def merge(
    root: str,
    save_path: Optional[str] = None,
    *,
    verify_checksums: bool = True,
    allow_incomplete: bool = False,
    progress: bool = False,
) -> Dict[str, Any]:
    """Build (and write, if ``save_path``) the manifest of every shard under ``root``.

    ``allow_incomplete`` merges what is complete and lists the rest under ``"incomplete"``
    instead of refusing.
    """
    remote = wio.is_remote(root)
    tree = _StoreTree(root) if remote else _LocalTree(root)
    save_path = save_path or (
        wio.join_url(root.rstrip("/") + "/", "index.json") if remote else os.path.join(root, "index.json")
    )
    base = tree.base(save_path)
    indexes, tars, tmps, marker_paths = _scan(tree)
    problems = [
        f"{wio.redact(p)}: incomplete shard left by an interrupted writer (rerun that rank "
        "with resume to redo it)"
        for p in tmps
    ]
    loaded = [(p, _load(tree, p, problems, "shard_index")) for p in indexes]
    indexes = [p for p, d in loaded if d is not None]
    docs = [d for _, d in loaded if d is not None]
    if not docs and not problems:
        raise MergeError([f"{root}: no shard indexes (*.idx.json) found"])
    shards: List[Dict[str, Any]] = []
    seen_keys: Dict[str, str] = {}
    ident = None
    named = set()
    it = tqdm(zip(indexes, docs), total=len(docs), desc="merge", disable=not progress, unit="shard")
    for ipath, idx in it:
        tar = tree.sibling(ipath, idx["shard"])
        named.add(tar)
        size = tree.size(tar)
        if size is None:
            problems.append(f"{wio.redact(tar)}: shard missing (named by {wio.redact(ipath)})")
            continue
        if size != idx["bytes"]:
            problems.append(f"{tar}: {size} bytes, its index says {idx['bytes']} (truncated or overwritten)")
            continue
        if verify_checksums and tree.sha256(tar) != idx["sha256"]:
            problems.append(f"{tar}: sha256 mismatch with its index (corrupt shard)")
            continue
        this = (idx["dtype"], idx["vocab_size"], json.dumps(idx.get("tokenizer"), sort_keys=True))
        if ident is None:
            ident = this
        elif this != ident:
            problems.append(f"{tar}: dtype/vocab_size/tokenizer {this} differ from other shards' {ident}")
            continue
        for k in idx["samples"]["key"]:
            if k in seen_keys:
                problems.append(f"duplicate key {k!r} in {tar} and {seen_keys[k]}")
                break
            seen_keys[k] = tar
        if tree.relpath(tar, base).startswith(".."):
            problems.append(
                f"{tar}: outside the folder of the manifest {save_path} (readers "
                "refuse manifest entries that leave its folder: save the manifest "
                "in the dataset folder)"
            )
            continue
        shards.append(
            {
                "path": tree.relpath(tar, base),
                "index": tree.relpath(ipath, base),
                "rank": idx.get("rank", 0),
                "shard_id": idx.get("shard_id", 0),
                "num_samples": idx["num_samples"],
                "num_tokens": idx["num_tokens"],
                "num_supervised": idx["num_supervised"],
                "bytes": idx["bytes"],
                "sha256": idx["sha256"],
            }
        )
    for t in sorted(tars - named):
        problems.append(f"{t}: shard without an index (the writer stopped before finishing it)")
    ranks = _check_ranks(tree, docs, marker_paths, problems)
    if problems and not allow_incomplete:
        raise MergeError(problems)
    shards.sort(key=lambda s: (s["rank"], s["shard_id"], s["path"]))
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": "manifest",
        "dtype": ident[0] if ident else None,
        "vocab_size": ident[1] if ident else None,
        "tokenizer": docs[0].get("tokenizer") if docs else None,
        "num_shards": len(shards),
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_tokens": sum(s["num_tokens"] for s in shards),
        "num_supervised": sum(s["num_supervised"] for s in shards),
        "bytes": sum(s["bytes"] for s in shards),
        "num_failed": sum(int(r.get("extra", {}).get("num_failed", 0)) for r in ranks),
        "ranks": ranks,
        "shards": shards,
    }
    if problems:
        manifest["incomplete"] = problems
    tree.save(save_path, manifest)  # last: readers open a dataset by its manifest
    return manifest


def _check_ranks(tree, docs, marker_paths, problems) -> List[Dict[str, Any]]:
    markers = {}
    for p in marker_paths:
        m = _load(tree, p, problems, "rank_done")
        if m is not None:
            markers[(m["prefix"], m["rank"])] = m
    expected: Dict[Any, Any] = {}
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
                problems.append(
                    f"rank {r} of {e['world_size']} ({prefix!r}) {why}: no "
                    f"{prefix}-r{r:05d}.done.json (rerun that rank)"
                )
    return [
        {
            "prefix": m["prefix"],
            "rank": m["rank"],
            "num_shards": m["num_shards"],
            "num_samples": m["num_samples"],
            "extra": m.get("extra", {}),
        }
        for _, m in sorted(markers.items())
    ]
