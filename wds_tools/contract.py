"""The on-disk contract around the byte layout: file names, index validation, checksums and
atomic JSON writes, each defined once.

:mod:`wds_tools.format` owns the bytes inside a shard (tar members, ``.npy``, sample JSON);
this module owns what sits around them: how shards, indexes and rank markers are named, what
a shard index must hold to be trusted, how a shard's sha256 is computed, and how a JSON file
is replaced atomically. The writer, merge, reader, verify and the trainer's checkpoints all
use these, so the contract has one home (see ``docs/format.md``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, BinaryIO, Dict, Optional, Tuple

import numpy as np

from . import io as wio
from .format import _KEY_RE, FormatError, shard_index_name, token_dtype

__all__ = [
    "shard_name",
    "done_marker_name",
    "rank_object_re",
    "shard_index_name",
    "check_index",
    "index_columns",
    "sha256_stream",
    "sha256_bytes",
    "sha256_file",
    "sha256_url",
    "write_json_atomic",
    "is_count",
    "short_repr",
]

HASH_CHUNK = 4 << 20


# --- names -----------------------------------------------------------------------------------


def shard_name(prefix: str, rank: int, shard_id: int) -> str:
    """``PREFIX-rRRRRR-SSSSSS.tar``: shard ``shard_id`` of writer rank ``rank``."""
    return f"{prefix}-r{rank:05d}-{shard_id:06d}.tar"


def done_marker_name(prefix: str, rank: int) -> str:
    """``PREFIX-rRRRRR.done.json``: rank ``rank`` finished writing."""
    return f"{prefix}-r{rank:05d}.done.json"


def rank_object_re(prefix: str, rank: int) -> "re.Pattern[str]":
    """Names of one rank's objects: group 1 is the shard id (absent for rank-level files)."""
    return re.compile(rf"^{re.escape(prefix)}-r{rank:05d}(?:-(\d{{6}}))?\.")


# --- index validation ------------------------------------------------------------------------


def is_count(v: Any) -> bool:
    return type(v) is int and v >= 0


def short_repr(v: Any) -> str:
    """``repr(v)`` cut to 60 characters and scrubbed of credentials (for error lines)."""
    r = repr(v)
    return wio.scrub(r if len(r) <= 60 else r[:57] + "...")


def check_index(index: Any, where: str, *, checksums: bool = False) -> None:
    """Refuse a shard index that cannot be trusted, with a FormatError naming the field, so a
    damaged or hostile index never raises KeyError/TypeError deep in a read. ``checksums``:
    also require the shard's ``bytes`` and ``sha256`` (what merge copies into the manifest)."""
    index_columns(index, where, checksums=checksums)


_INT_COLUMNS = ("offset", "length", "num_tokens", "num_supervised")
_KEY_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"  # as _KEY_RE


def index_columns(index: Any, where: str, *, checksums: bool = False) -> Dict[str, np.ndarray]:
    """:func:`check_index`, returning the integer columns (``offset``, ``length``,
    ``num_tokens``, ``num_supervised``) as int64 arrays (a column holding a count beyond int64
    is valid but left out). Each column is checked in one pass at
    C speed (the types of its values as a set, then one array); the value-by-value scan that
    names the first bad entry runs only when a column fails."""
    if not isinstance(index, dict):
        raise FormatError(f"{where}: shard index must be a JSON object")
    try:
        dt = np.dtype(index.get("dtype")) if isinstance(index.get("dtype"), str) else None
    except Exception:  # noqa: BLE001 - numpy raises TypeError, ValueError, SyntaxError...
        dt = None
    if dt is None or dt.kind != "u" or dt.itemsize not in (1, 2, 4, 8):
        raise FormatError(
            f"{where}: index dtype {short_repr(index.get('dtype'))} is not an unsigned integer type"
        )
    if dt.byteorder == ">":
        raise FormatError(f"{where}: index dtype {short_repr(index.get('dtype'))} is big-endian")
    if not is_count(index.get("num_samples")):
        raise FormatError(
            f"{where}: index 'num_samples' must be a non-negative integer, "
            f"got {short_repr(index.get('num_samples'))}"
        )
    vs = index.get("vocab_size")
    if vs is not None and (type(vs) is not int or vs < 1):
        raise FormatError(f"{where}: index vocab_size must be a positive integer, got {short_repr(vs)}")
    if vs is not None and token_dtype(vs) != dt:
        raise FormatError(
            f"{where}: index dtype {dt} is not the dtype of a {vs}-token vocabulary ({token_dtype(vs)})"
        )
    cols = index.get("samples")
    if not isinstance(cols, dict):
        raise FormatError(f"{where}: index 'samples' must be an object of columns")
    out: Dict[str, np.ndarray] = {}
    for k in ("key", *_INT_COLUMNS):
        col = cols.get(k)
        if not isinstance(col, list):
            raise FormatError(f"{where}: index column samples.{k} must be a list")
        if k == "key":
            if col and not _keys_ok(col):
                bad = [v for v in col if type(v) is not str or not _KEY_RE.match(v)][:1]
                if bad:
                    raise FormatError(f"{where}: index key {short_repr(bad[0])} is not a valid sample key")
        else:
            arr = _count_array(col)
            if arr is None:
                bad = [v for v in col if type(v) is not int or v < 0][:1]
                if bad:
                    raise FormatError(
                        f"{where}: index column samples.{k} holds "
                        f"{short_repr(bad[0])}, not a non-negative integer"
                    )
            else:
                out[k] = arr  # (counts beyond int64 pass, as before, but have no array)
    if checksums:
        if not is_count(index.get("bytes")):
            raise FormatError(f"{where}: index 'bytes' must be a non-negative integer")
        if not isinstance(index.get("sha256"), str):
            raise FormatError(f"{where}: index 'sha256' must be a hex digest string")
    return out


def _keys_ok(col: list) -> bool:
    """Every value is a valid sample key (``_KEY_RE``): strings of 1-80 characters from
    ``[A-Za-z0-9_-]``, checked over all keys at once (False: look key by key)."""
    if set(map(type, col)) != {str}:
        return False
    lens = list(map(len, col))
    joined = "".join(col)
    return (
        min(lens) >= 1
        and max(lens) <= 80
        and joined.isascii()
        and not joined.encode("ascii").translate(None, _KEY_CHARS)
    )


def _count_array(col: list) -> Optional[np.ndarray]:
    """``col`` as int64 when every value is an ``int`` (not a bool) in ``[0, 2**63)``, else None."""
    if not col:
        return np.zeros(0, np.int64)
    if set(map(type, col)) != {int}:
        return None
    try:
        arr = np.array(col, dtype=np.int64)
    except OverflowError:
        return None
    return arr if arr.min() >= 0 else None


# --- checksums -------------------------------------------------------------------------------


def sha256_stream(f: BinaryIO, chunk: int = HASH_CHUNK) -> Tuple[str, int]:
    """(sha256 hex digest, byte count) of everything left in ``f``."""
    h, n = hashlib.sha256(), 0
    while True:
        b = f.read(chunk)
        if not b:
            return h.hexdigest(), n
        h.update(b)
        n += len(b)


def sha256_bytes(data: Any) -> str:
    """sha256 hex digest of bytes already in memory."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str, chunk: int = HASH_CHUNK) -> str:
    """sha256 hex digest of a local file (the value a shard index records)."""
    with open(path, "rb") as f:
        return sha256_stream(f, chunk)[0]


def sha256_url(url: str, opts: wio.IOOptions = wio.DEFAULT) -> Tuple[str, int]:
    """(sha256 hex digest, byte count) of a local or remote object, read once, streaming."""
    with wio.open_range(url, 0, None, opts) as f:
        return sha256_stream(f)


# --- atomic JSON -----------------------------------------------------------------------------


def write_json_atomic(path: str, doc: Any, *, indent: Optional[int] = None) -> None:
    """Write ``doc`` to ``path`` through a temp file, fsync'ed and renamed over it: a reader
    (or a resume after a crash) sees the old file or the new one, never half of one."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=indent, separators=None if indent else (",", ":"))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
