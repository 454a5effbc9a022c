"""ShardWriter: validated samples into rank-named tar shards, each completed atomically.

Each shard is written under ``NAME.tar.tmp``, fsynced, renamed to ``NAME.tar``, and only then is
its index ``NAME.idx.json`` written (also via a temp name). A crash therefore leaves either a
complete shard with its index or files that no reader or ``merge`` accepts. ``close()`` writes a
per-rank done-marker, so ``merge`` can tell a finished rank from one that died.

Names carry the rank (``shard-r00003-000012.tar``), so N processes write into one folder
without coordinating.

With a ``store`` (:mod:`wds_tools.store`: ``s3://`` or another folder), ``out_dir`` is local
staging: each completed shard is uploaded, then its index (the commit point), and the local
copies are removed; the done-marker goes up last. A resumed writer rebuilds its state from the
store (the committed indexes carry the cursor) and deletes what an interrupted run left there.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
from typing import Any, BinaryIO, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from .contract import done_marker_name, rank_object_re, shard_name, write_json_atomic
from .format import (
    END_OF_ARCHIVE,
    FORMAT_NAME,
    FORMAT_VERSION,
    FormatError,
    check_key,
    check_version,
    encode_sample,
    labels_to_spans,
    mask_to_spans,
    num_in_spans,
    shard_index_name,
    token_dtype,
)

__all__ = ["ShardWriter", "rank_files"]


def rank_files(out_dir: str, prefix: str, rank: int) -> Dict[str, List[str]]:
    """Existing files of one rank: complete indexes, shards, and temp leftovers."""
    base = os.path.join(glob.escape(out_dir), f"{glob.escape(prefix)}-r{rank:05d}")
    return {
        "indexes": sorted(glob.glob(base + "-*.idx.json")),
        "shards": sorted(glob.glob(base + "-*.tar")),
        "tmp": sorted(glob.glob(base + "-*.tmp")),
    }


class ShardWriter:
    """Write (key, token ids, supervision, metadata) samples into format-v1 shards.

    Args:
        out_dir: output folder (created); several ranks may share it.
        vocab_size: number of tokens in the vocabulary; picks the token dtype.
        rank, world_size: this writer's rank among the independent writers of one dataset.
        prefix: shard file name prefix.
        max_samples, max_bytes: a shard is completed before it would exceed either.
        tokenizer: identity of the tokenizer (a name or a dict, e.g. name + sha256), recorded
            in every index and checked for agreement by ``merge``.
        resume: continue a rank that was interrupted or has finished: complete shards are
            kept, temp leftovers removed, numbering continues; ``resume_cursor`` tells where.
            Without it, an output folder that already holds files of this rank is an error.
        increasing_keys: the caller writes keys in increasing order (by length, then
            characters); duplicates are then caught by comparing with the previous key instead
            of a set of all keys, so memory stays flat however many samples a rank writes.
        store: where completed shards go (see the module docstring); ``out_dir`` is staging.

    ``cursor`` is a caller-defined progress marker (e.g. the next input item); its value when
    a shard completes is stored in that shard's index and comes back as ``resume_cursor``.
    ``cursor_state`` (a small JSON-able dict, optional) is stored beside it and comes back as
    ``resume_state``. ``before_publish(shard_name)``, if set, returns local files to upload to
    the store before that shard (they belong to it: a resume deletes them if the shard's index
    never went up).
    """

    def __init__(
        self,
        out_dir: str,
        *,
        vocab_size: int,
        rank: int = 0,
        world_size: int = 1,
        prefix: str = "shard",
        max_samples: int = 10_000,
        max_bytes: int = 1 << 30,
        tokenizer: Optional[Any] = None,
        resume: bool = False,
        increasing_keys: bool = False,
        store: Optional[Any] = None,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if max_samples < 1 or max_bytes < 4096:
            raise ValueError("max_samples must be >= 1 and max_bytes >= 4096")
        if not re.match(r"^[A-Za-z0-9_\-]+$", prefix):
            raise ValueError(f"prefix {prefix!r}: use [A-Za-z0-9_-] only")
        self.out_dir, self.prefix, self.rank, self.world_size = out_dir, prefix, rank, world_size
        self.vocab_size, self.dtype = int(vocab_size), token_dtype(vocab_size)
        self.max_samples, self.max_bytes, self.tokenizer = max_samples, max_bytes, tokenizer
        self.cursor: int = 0
        self.resume_cursor: int = 0
        self.cursor_state: Optional[dict] = None
        self.resume_state: Optional[dict] = None
        self.store = store
        self.before_publish: Optional[Callable[[str], List[str]]] = None
        self.num_samples = self.num_tokens = 0
        self.increasing_keys = increasing_keys
        self._last_key: Optional[tuple] = None
        self._keys: set = set()
        self._next_shard = 0
        self._f: Optional[BinaryIO] = None
        self._closed = False
        os.makedirs(out_dir, exist_ok=True)
        self._prepare(resume)

    # -- setup / resume ----------------------------------------------------------------------
    def _prepare(self, resume: bool) -> None:
        files = rank_files(self.out_dir, self.prefix, self.rank)
        marker = os.path.join(self.out_dir, done_marker_name(self.prefix, self.rank))
        if self.store is not None:
            # staging holds nothing worth keeping: what was complete went up to the store
            for p in files["indexes"] + files["shards"] + files["tmp"] + [marker]:
                if os.path.exists(p):
                    os.remove(p)
            self._prepare_store(resume)
            return
        if not resume:
            if files["indexes"] or files["shards"] or files["tmp"] or os.path.exists(marker):
                raise FileExistsError(
                    f"{self.out_dir} already holds shards of rank {self.rank} (prefix "
                    f"{self.prefix!r}); pass resume=True to continue them or use a fresh folder"
                )
            return
        for p in files["tmp"]:
            os.remove(p)
        if os.path.exists(marker):
            os.remove(marker)
        indexed = set()
        for ip in files["indexes"]:
            with open(ip) as f:
                idx = json.load(f)
            check_version(idx, ip)
            shard = os.path.join(self.out_dir, idx["shard"])
            if not os.path.exists(shard) or os.path.getsize(shard) != idx["bytes"]:
                os.remove(ip)  # its shard is gone or damaged: redo from before it
                continue
            indexed.add(shard)
            self._take_index(idx)
        for sp in files["shards"]:
            if sp not in indexed:  # renamed but its index never written: redo it
                os.remove(sp)
        self.cursor, self.cursor_state = self.resume_cursor, self.resume_state

    def _take_index(self, idx: Dict[str, Any]) -> None:
        """Fold one kept shard index into the resume state."""
        sid = int(idx["shard_id"])
        keys = idx["samples"]["key"]
        if sid >= self._next_shard:
            self._next_shard = sid + 1
            self.resume_cursor = int(idx.get("cursor", 0))
            self.resume_state = idx.get("cursor_state")
            if self.increasing_keys and keys:
                self._last_key = (len(keys[-1]), keys[-1])
        if not self.increasing_keys:
            self._keys.update(keys)
        self.num_samples += idx["num_samples"]
        self.num_tokens += idx["num_tokens"]

    def _prepare_store(self, resume: bool) -> None:
        """Resume state from the store: committed indexes (in order, while their shard is
        there whole); everything else of this rank there is deleted."""
        store = self.store
        assert store is not None
        pattern = rank_object_re(self.prefix, self.rank)
        base = f"{self.prefix}-r{self.rank:05d}"
        objects = {n: size for n, size in store.list(base) if pattern.match(n)}
        if objects and not resume:
            raise FileExistsError(
                f"{store.url} already holds objects of rank {self.rank} (prefix "
                f"{self.prefix!r}); pass resume=True to continue them or use a fresh prefix"
            )
        store.abort_uploads(base)
        sid = 0
        while True:
            name = shard_name(self.prefix, self.rank, sid)
            index_name = shard_index_name(name)
            if index_name not in objects:
                break
            idx = json.loads(store.read_bytes(index_name))
            check_version(idx, index_name)
            if objects.get(name) != idx["bytes"]:
                break  # its shard is gone or damaged: redo from here
            self._take_index(idx)
            sid += 1
        for n in sorted(objects):
            m = pattern.match(n)
            sid_text = m.group(1) if m else None
            if sid_text is None or int(sid_text) >= self._next_shard or n.endswith(".tmp"):
                store.delete(n)  # uncommitted shard files, the old done-marker, temp copies
        self.cursor, self.cursor_state = self.resume_cursor, self.resume_state

    # -- writing -------------------------------------------------------------------------------
    def write(
        self,
        key: str,
        input_ids: Sequence[int],
        *,
        labels: Optional[Sequence[int]] = None,
        mask: Optional[Sequence[bool]] = None,
        meta: Optional[Mapping[str, Any]] = None,
    ) -> None:
        """Validate and append one sample. Supervision: ``labels`` (-100 = not trained on,
        otherwise equal to the token) or a boolean ``mask``; neither means nothing supervised."""
        if self._closed:
            raise RuntimeError("ShardWriter is closed")
        check_key(key)
        if self.increasing_keys:
            order = (len(key), key)
            if self._last_key is not None and order <= self._last_key:
                raise FormatError(
                    f"sample key {key!r} does not come after {self._last_key[1]!r} "
                    "(increasing_keys: keys must increase, so none repeats)"
                )
        elif key in self._keys:
            raise FormatError(f"duplicate sample key {key!r} (keys must be unique in a dataset)")
        ids = self._check_ids(key, input_ids)
        if labels is not None and mask is not None:
            raise ValueError(f"sample {key!r}: give labels or mask, not both")
        if labels is not None:
            spans = labels_to_spans(ids, labels, key)
        elif mask is not None:
            m = np.asarray(mask)
            if m.shape != ids.shape:
                raise FormatError(f"sample {key!r}: mask has length {m.size} but input_ids {ids.size}")
            spans = mask_to_spans(m.astype(bool))
        else:
            spans = []
        data = encode_sample(key, ids, spans, meta)
        if self._f is not None and (
            self._n + 1 > self.max_samples or self._bytes + len(data) + len(END_OF_ARCHIVE) > self.max_bytes
        ):
            self._finish_shard()
        if self._f is None:
            self._open_shard()
        self._cols["key"].append(key)
        self._cols["offset"].append(self._bytes)
        self._cols["length"].append(len(data))
        self._cols["num_tokens"].append(int(ids.size))
        self._cols["num_supervised"].append(num_in_spans(spans))
        f = self._f
        assert f is not None  # opened above
        f.write(data)
        self._sha.update(data)
        self._bytes += len(data)
        self._n += 1
        if self.increasing_keys:
            self._last_key = (len(key), key)
        else:
            self._keys.add(key)
        self.num_samples += 1
        self.num_tokens += int(ids.size)

    def _check_ids(self, key: str, input_ids: Sequence[int]) -> np.ndarray:
        a = np.asarray(input_ids)
        if a.ndim != 1 or a.size == 0:
            raise FormatError(
                f"sample {key!r}: input_ids must be a non-empty 1-D sequence, got shape {a.shape}"
            )
        if a.dtype.kind not in "iu":
            raise FormatError(f"sample {key!r}: input_ids must be integers, got {a.dtype}")
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= self.vocab_size:
            bad = lo if lo < 0 else hi
            raise FormatError(
                f"sample {key!r}: token id {bad} is outside the vocabulary "
                f"[0, {self.vocab_size}) ({self.dtype} storage)"
            )
        return a.astype(self.dtype, copy=False)

    def _open_shard(self) -> None:
        self._name = shard_name(self.prefix, self.rank, self._next_shard)
        self._path = os.path.join(self.out_dir, self._name)
        self._f = open(self._path + ".tmp", "wb")
        self._sha = hashlib.sha256()
        self._bytes = self._n = 0
        self._cols: Dict[str, list] = {
            k: [] for k in ("key", "offset", "length", "num_tokens", "num_supervised")
        }

    def _finish_shard(self) -> None:
        f = self._f
        assert f is not None  # only called with a shard open
        f.write(END_OF_ARCHIVE)
        self._sha.update(END_OF_ARCHIVE)
        self._bytes += len(END_OF_ARCHIVE)
        f.flush()
        os.fsync(f.fileno())
        f.close()
        self._f = None
        os.replace(self._path + ".tmp", self._path)
        index = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "kind": "shard_index",
            "shard": self._name,
            "shard_id": self._next_shard,
            "rank": self.rank,
            "world_size": self.world_size,
            "dtype": self.dtype.name,
            "vocab_size": self.vocab_size,
            "tokenizer": self.tokenizer,
            "num_samples": self._n,
            "num_tokens": int(sum(self._cols["num_tokens"])),
            "num_supervised": int(sum(self._cols["num_supervised"])),
            "bytes": self._bytes,
            "sha256": self._sha.hexdigest(),
            "cursor": self.cursor,
            "samples": self._cols,
        }
        if self.cursor_state is not None:
            index["cursor_state"] = self.cursor_state
        index_path = os.path.join(self.out_dir, shard_index_name(self._name))
        write_json_atomic(index_path, index)
        if self.store is not None:
            self._publish(self._name, self._path, index_path)
        self._next_shard += 1

    def _publish(self, name: str, shard_path: str, index_path: str) -> None:
        """Upload the shard's companions, the shard, then its index (the commit point)."""
        store = self.store
        assert store is not None
        extra = self.before_publish(name) if self.before_publish is not None else []
        for p in extra:
            store.put(p, os.path.basename(p))
        store.put(shard_path, name)
        store.put(index_path, shard_index_name(name))
        for p in [*extra, shard_path, index_path]:
            os.remove(p)

    def finish_shard(self) -> None:
        """Complete the shard in progress now (if any); the next sample starts a new one."""
        if self._f is not None:
            self._finish_shard()

    # -- closing -------------------------------------------------------------------------------
    def close(self, extra: Optional[Mapping[str, Any]] = None) -> None:
        """Complete the last shard and mark this rank done (``extra`` is kept in the marker)."""
        if self._closed:
            return
        if self._f is not None:
            self._finish_shard()
        marker = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "kind": "rank_done",
            "prefix": self.prefix,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_shards": self._next_shard,
            "num_samples": self.num_samples,
            "num_tokens": self.num_tokens,
            "cursor": self.cursor,
            "extra": dict(extra or {}),
        }
        path = os.path.join(self.out_dir, done_marker_name(self.prefix, self.rank))
        write_json_atomic(path, marker)
        if self.store is not None:
            self.store.put(path, done_marker_name(self.prefix, self.rank))
            os.remove(path)
        self._closed = True

    def abort(self) -> None:
        """Drop the shard in progress (complete shards stay, ready for ``resume=True``)."""
        if self._f is not None:
            self._f.close()
            os.remove(self._path + ".tmp")
            self._f = None
        self._closed = True

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
