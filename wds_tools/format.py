"""The on-disk token-shard format, version 1: the byte layout lives here and nowhere else.

A sample is two consecutive tar members sharing a key::

    KEY.input_ids.npy   1-D token ids, ``numpy.save`` format (never pickled), smallest unsigned dtype
    KEY.json            {"supervised": [[start, end], ...], "meta": {...}}

``supervised`` lists half-open position ranges whose labels equal the token ids; every other
position has label -100. See ``docs/format.md`` for the full contract (shard index, manifest).
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from typing import Any, Iterable, List, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "FORMAT_NAME", "FORMAT_VERSION", "IDS_SUFFIX", "JSON_SUFFIX", "IGNORE_INDEX", "BLOCK",
    "FormatError", "token_dtype", "check_version", "check_key", "encode_sample", "decode_sample",
    "decode_ids_spans", "mask_to_spans", "labels_to_spans", "spans_to_labels", "num_in_spans", "tar_header",
    "parse_tar_header", "padded", "END_OF_ARCHIVE", "shard_index_name",
]

FORMAT_NAME = "wds-tokens"
FORMAT_VERSION = "1.0"
IDS_SUFFIX = "input_ids.npy"
JSON_SUFFIX = "json"
IGNORE_INDEX = -100
BLOCK = 512
END_OF_ARCHIVE = b"\0" * (2 * BLOCK)
INDEX_SUFFIX = ".idx.json"
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]{1,80}$")
_NPY_MAGIC = b"\x93NUMPY"


class FormatError(ValueError):
    """Bad data or a file that does not follow the format (named in the message)."""


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds every id of a vocabulary of ``vocab_size`` tokens."""
    if not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    for dt in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dt).max:
            return np.dtype(dt)
    return np.dtype(np.uint64)


def check_version(doc: Mapping[str, Any], where: str) -> None:
    """Refuse documents of another format or of an unknown major version, naming the file."""
    if not isinstance(doc, Mapping) or doc.get("format") != FORMAT_NAME:
        got = doc.get("format") if isinstance(doc, Mapping) else type(doc).__name__
        raise FormatError(f"{where}: not a {FORMAT_NAME} file (format={got!r})")
    version = str(doc.get("version", ""))
    major = version.split(".")[0]
    if major != FORMAT_VERSION.split(".")[0]:
        raise FormatError(
            f"{where}: format version {version!r} is not supported; this wds_tools reads "
            f"version {FORMAT_VERSION.split('.')[0]}.x (upgrade wds_tools to read newer data)")


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise FormatError(
            f"bad sample key {key!r}: use 1-80 characters from [A-Za-z0-9_-] (no dots or slashes)")
    return key


def shard_index_name(shard_name: str) -> str:
    """``x.tar`` -> ``x.idx.json`` (the index lives beside its shard)."""
    stem = shard_name[:-4] if shard_name.endswith(".tar") else shard_name
    return stem + INDEX_SUFFIX


# --- supervision -------------------------------------------------------------------------

def mask_to_spans(mask: np.ndarray) -> List[List[int]]:
    """Boolean mask -> sorted half-open ``[start, end)`` ranges of True positions."""
    m = np.asarray(mask, dtype=bool).astype(np.int8)
    if m.size == 0:
        return []
    edges = np.diff(np.concatenate(([0], m, [0])))
    starts = np.flatnonzero(edges == 1)
    ends = np.flatnonzero(edges == -1)
    return [[int(s), int(e)] for s, e in zip(starts, ends)]


def labels_to_spans(input_ids: np.ndarray, labels: Sequence[int], key: str = "?") -> List[List[int]]:
    lab = np.asarray(labels)
    if lab.shape != input_ids.shape:
        raise FormatError(f"sample {key!r}: labels have length {lab.size} but input_ids {input_ids.size}")
    sup = lab != IGNORE_INDEX
    bad = np.flatnonzero(sup & (lab != input_ids.astype(np.int64)))
    if bad.size:
        p = int(bad[0])
        raise FormatError(
            f"sample {key!r}: label at position {p} is {int(lab[p])}, not -100 or the token id "
            f"{int(input_ids[p])} (supervision is stored as a mask)")
    return mask_to_spans(sup)


def spans_to_labels(input_ids: np.ndarray, spans: Iterable[Sequence[int]]) -> np.ndarray:
    """Rebuild int64 labels: token id inside the spans, -100 elsewhere."""
    labels = input_ids.astype(np.int64)
    prev = 0
    for s, e in spans:  # fill the gaps between spans
        if s > prev:
            labels[prev:s] = IGNORE_INDEX
        prev = e
    if prev < labels.shape[0]:
        labels[prev:] = IGNORE_INDEX
    return labels


def num_in_spans(spans: Iterable[Sequence[int]]) -> int:
    return sum(e - s for s, e in spans)


def _check_spans(spans: Any, n: int, where: str) -> List[List[int]]:
    if not isinstance(spans, list):
        raise FormatError(f"{where}: 'supervised' must be a list of [start, end] pairs")
    prev = 0
    for sp in spans:
        if (not isinstance(sp, list) or len(sp) != 2 or not all(isinstance(x, int) for x in sp)
                or not prev <= sp[0] < sp[1] <= n):
            raise FormatError(f"{where}: bad supervised span {sp!r} for {n} tokens "
                              "(spans must be sorted, disjoint, non-empty, inside the sample)")
        prev = sp[1]
    return spans


# --- tar members -------------------------------------------------------------------------

def padded(n: int) -> int:
    """Size of ``n`` payload bytes rounded up to whole tar blocks."""
    return (n + BLOCK - 1) // BLOCK * BLOCK


def tar_header(name: str, size: int) -> bytes:
    """A deterministic ustar header (mtime 0, root owner, mode 0644): shards are reproducible."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uname = ti.gname = ""
    return ti.tobuf(format=tarfile.USTAR_FORMAT, encoding="utf-8", errors="strict")


def parse_tar_header(block: bytes, where: str) -> tuple:
    """(name, size) of a ustar header block; raises FormatError on anything else."""
    if len(block) < BLOCK:
        raise FormatError(f"{where}: truncated tar header ({len(block)} of {BLOCK} bytes)")
    if block[257:262] != b"ustar":
        raise FormatError(f"{where}: not a tar header (bad magic)")
    stored = int(block[148:156].strip(b"\0 ") or b"0", 8)
    computed = sum(block[:148]) + 256 + sum(block[156:BLOCK])
    if stored != computed:
        raise FormatError(f"{where}: tar header checksum mismatch (corrupt shard)")
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    size = int(block[124:136].strip(b"\0 ") or b"0", 8)
    return name.decode("utf-8"), size


def _member(name: str, payload: bytes) -> bytes:
    return tar_header(name, len(payload)) + payload + b"\0" * (padded(len(payload)) - len(payload))


def encode_sample(key: str, input_ids: np.ndarray, spans: List[List[int]],
                  meta: Optional[Mapping[str, Any]]) -> bytes:
    """The tar bytes of one sample (both members, block-padded)."""
    buf = io.BytesIO()
    np.save(buf, input_ids, allow_pickle=False)
    doc = {"supervised": spans, "meta": dict(meta or {})}
    try:
        js = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FormatError(f"sample {key!r}: metadata is not JSON-serializable: {e}") from None
    return (_member(f"{key}.{IDS_SUFFIX}", buf.getvalue())
            + _member(f"{key}.{JSON_SUFFIX}", js.encode("utf-8")))


def decode_ids_spans(buf, offset: int, length: int, key: str, num_tokens: int, dtype: np.dtype,
                     where: str = "", check: bool = False) -> tuple:
    """``(input_ids, supervised spans, meta)`` of the sample whose first tar header is at
    ``buf[offset]``: the hot-path primitive (no label array; collation builds labels from spans).

    Uses the shard index (key, length, token count, dtype) to skip generic tar parsing; the cheap
    checks (header magic, member names, npy magic and sizes) always run, so a misplaced offset or
    a truncated buffer raises FormatError instead of yielding a partial sample. ``check=True``
    also validates header checksums, the npy header and the spans (what ``verify`` uses).
    ``input_ids`` is a read-only view into ``buf``.
    """
    end = offset + length
    if len(buf) < end:
        raise FormatError(f"{where}: sample {key!r} is truncated ({len(buf) - offset} of {length} bytes)")
    kb = key.encode()
    nk = len(kb)
    if buf[offset:offset + nk + 1] != kb + b"." or buf[offset + 257:offset + 262] != b"ustar":
        raise FormatError(f"{where}: no tar header of sample {key!r} at byte {offset} "
                          "(index and shard disagree)")
    p = offset + BLOCK
    if buf[p:p + 6] != _NPY_MAGIC:
        raise FormatError(f"{where}: sample {key!r}: {IDS_SUFFIX} is not a .npy array")
    data = p + 10 + (buf[p + 8] | (buf[p + 9] << 8))
    npy_size = data - p + num_tokens * dtype.itemsize
    j = p + (npy_size + BLOCK - 1) // BLOCK * BLOCK
    if buf[j:j + nk + 6] != kb + b".json\0":
        raise FormatError(f"{where}: sample {key!r}: expected member {key}.json at byte {j}")
    if check:
        _check_members(buf, offset, j, key, npy_size, num_tokens, dtype, where)
    try:
        jsize = int(buf[j + 124:j + 135], 8)
    except ValueError:
        raise FormatError(f"{where}: sample {key!r}: corrupt tar header of {key}.json") from None
    if j + BLOCK + (jsize + BLOCK - 1) // BLOCK * BLOCK != end:
        raise FormatError(f"{where}: sample {key!r}: member sizes do not add up to the indexed "
                          f"length {length}")
    try:
        doc = _json_raw_decode(buf[j + BLOCK:j + BLOCK + jsize].decode("utf-8"))[0]
        spans = doc["supervised"]
        meta = doc.get("meta", {})
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise FormatError(f"{where}: sample {key!r}: bad JSON member: {e!r}") from None
    if check or type(spans) is not list:
        _check_spans(spans, num_tokens, f"{where}: sample {key!r}")
    return np.frombuffer(buf, dtype=dtype, count=num_tokens, offset=data), spans, meta


def decode_sample(buf, offset: int, length: int, key: str, num_tokens: int, dtype: np.dtype,
                  where: str, check: bool = False) -> dict:
    """The sample at ``buf[offset]`` as a dict: ``__key__``, ``input_ids`` (read-only view),
    ``labels`` (int64, -100 where not supervised), ``meta``, ``num_supervised``."""
    ids, spans, meta = decode_ids_spans(buf, offset, length, key, num_tokens, dtype, where, check)
    labels = spans_to_labels(ids, spans)
    return {"__key__": key, "input_ids": ids, "labels": labels, "meta": meta,
            "num_supervised": num_in_spans(spans)}


_json_raw_decode = json.JSONDecoder().raw_decode  # no trailing-whitespace scan of json.loads


def _check_members(buf, offset, j, key, npy_size, num_tokens, dtype, where) -> None:
    w = f"{where}: sample {key!r}"
    name, size = parse_tar_header(bytes(buf[offset:offset + BLOCK]), w)
    if name != f"{key}.{IDS_SUFFIX}" or size != npy_size:
        raise FormatError(f"{w}: member {name!r} of {size} bytes does not match the index "
                          f"({num_tokens} tokens of {dtype})")
    _check_npy_header(bytes(buf[offset + BLOCK:offset + BLOCK + npy_size - num_tokens * dtype.itemsize]),
                      num_tokens, dtype, w)
    parse_tar_header(bytes(buf[j:j + BLOCK]), w)


def _check_npy_header(raw: bytes, n: int, dtype: np.dtype, where: str) -> None:
    try:
        f = io.BytesIO(raw)
        major, _ = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if major == 1
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dt = read(f)  # parses the header dict only; never unpickles
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error
        raise FormatError(f"{where}: bad .npy header: {e}") from None
    if shape != (n,) or dt != dtype or fortran:
        raise FormatError(f"{where}: .npy holds {dt} {shape}, the index says {dtype} ({n},)")
