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
import json.scanner
import re
import tarfile
from typing import Any, Iterable, List, Mapping, Optional, Sequence

import numpy as np

__all__ = [
    "check_spans",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "IDS_SUFFIX",
    "JSON_SUFFIX",
    "IGNORE_INDEX",
    "BLOCK",
    "FormatError",
    "token_dtype",
    "check_version",
    "check_key",
    "encode_sample",
    "decode_sample",
    "decode_ids_spans",
    "decode_block",
    "decode_block_parts",
    "key_table",
    "mask_to_spans",
    "labels_to_spans",
    "spans_to_labels",
    "num_in_spans",
    "tar_header",
    "parse_tar_header",
    "padded",
    "END_OF_ARCHIVE",
    "shard_index_name",
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
            f"version {FORMAT_VERSION.split('.')[0]}.x (upgrade wds_tools to read newer data)"
        )


def check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise FormatError(
            f"bad sample key {key!r}: use 1-80 characters from [A-Za-z0-9_-] (no dots or slashes)"
        )
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
            f"{int(input_ids[p])} (supervision is stored as a mask)"
        )
    return mask_to_spans(sup)


def spans_to_labels(
    input_ids: np.ndarray, spans: Iterable[Sequence[int]], out: Optional[np.ndarray] = None
) -> np.ndarray:
    """Rebuild int64 labels: token id inside the spans, -100 elsewhere (written into
    ``out[:len(input_ids)]`` and returned as that slice when ``out``, an int64 array, is given)."""
    if out is None:
        labels = input_ids.astype(np.int64)
    else:
        labels = out[: input_ids.shape[0]]
        labels[...] = input_ids
    prev = 0
    for s, e in spans:  # fill the gaps between spans
        if s > prev:
            labels[prev:s].fill(IGNORE_INDEX)
        prev = e
    if prev < labels.shape[0]:
        labels[prev:].fill(IGNORE_INDEX)
    return labels


def num_in_spans(spans: Iterable[Sequence[int]]) -> int:
    return sum(e - s for s, e in spans)


def _spans_ok(spans: Any, n: int) -> bool:
    """Fast form of ``check_spans`` (no message): sorted, disjoint, non-empty, in ``[0, n]``."""
    if type(spans) is not list:
        return False
    prev = 0
    for sp in spans:
        if type(sp) is not list or len(sp) != 2:
            return False
        a, b = sp
        if type(a) is not int or type(b) is not int or not prev <= a < b <= n:
            return False
        prev = b
    return True


def check_spans(spans: Any, n: int, where: str) -> List[List[int]]:
    if not isinstance(spans, list):
        raise FormatError(f"{where}: 'supervised' must be a list of [start, end] pairs")
    prev = 0
    for sp in spans:
        if (
            not isinstance(sp, list)
            or len(sp) != 2
            or not all(isinstance(x, int) for x in sp)
            or not prev <= sp[0] < sp[1] <= n
        ):
            raise FormatError(
                f"{where}: bad supervised span {sp!r} for {n} tokens "
                "(spans must be sorted, disjoint, non-empty, inside the sample)"
            )
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
    try:
        stored = int(block[148:156].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise FormatError(f"{where}: tar header checksum field is not octal (corrupt shard)") from None
    computed = sum(block[:148]) + 256 + sum(block[156:BLOCK])
    if stored != computed:
        raise FormatError(f"{where}: tar header checksum mismatch (corrupt shard)")
    name = block[:100].split(b"\0", 1)[0]
    prefix = block[345:500].split(b"\0", 1)[0]
    if prefix:
        name = prefix + b"/" + name
    try:
        size = int(block[124:136].strip(b"\0 ") or b"0", 8)
        return name.decode("utf-8"), size
    except (ValueError, UnicodeDecodeError):
        raise FormatError(f"{where}: corrupt tar header (size field or member name)") from None


def _member(name: str, payload: bytes) -> bytes:
    return tar_header(name, len(payload)) + payload + b"\0" * (padded(len(payload)) - len(payload))


def encode_sample(
    key: str, input_ids: np.ndarray, spans: List[List[int]], meta: Optional[Mapping[str, Any]]
) -> bytes:
    """The tar bytes of one sample (both members, block-padded)."""
    buf = io.BytesIO()
    np.save(buf, input_ids, allow_pickle=False)
    doc = {"supervised": spans, "meta": dict(meta or {})}
    try:
        js = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise FormatError(f"sample {key!r}: metadata is not JSON-serializable: {e}") from None
    return _member(f"{key}.{IDS_SUFFIX}", buf.getvalue()) + _member(
        f"{key}.{JSON_SUFFIX}", js.encode("utf-8")
    )


def decode_ids_spans(
    buf,
    offset: int,
    length: int,
    key: str,
    num_tokens: int,
    dtype: np.dtype,
    where: str = "",
    check: bool = False,
) -> tuple:
    """``(input_ids, supervised spans, meta)`` of the sample whose first tar header is at
    ``buf[offset]``: the hot-path primitive (no label array; collation builds labels from spans).

    Uses the shard index (key, length, token count, dtype) to skip generic tar parsing; the cheap
    checks (header magic, member names, npy magic and sizes) always run, so a misplaced offset or
    a truncated buffer raises FormatError instead of yielding a partial sample. ``check=True``
    also validates header checksums, the npy header and the spans (what ``verify`` uses).
    ``input_ids`` is a view into ``buf`` (read-only when ``buf`` is), which may be ``bytes``,
    an ``mmap``, a ``memoryview`` or any other bytes-like object.
    """
    end = offset + length
    if len(buf) < end:
        raise FormatError(f"{where}: sample {key!r} is truncated ({len(buf) - offset} of {length} bytes)")
    kb = key.encode()
    nk = len(kb)
    if buf[offset : offset + nk + 1] != kb + b"." or buf[offset + 257 : offset + 262] != b"ustar":
        raise FormatError(
            f"{where}: no tar header of sample {key!r} at byte {offset} (index and shard disagree)"
        )
    p = offset + BLOCK
    if buf[p : p + 6] != _NPY_MAGIC:
        raise FormatError(f"{where}: sample {key!r}: {IDS_SUFFIX} is not a .npy array")
    descr = _descr(dtype)
    if buf[p + 10 : p + 10 + len(descr)] != descr:
        raise FormatError(
            f"{where}: sample {key!r}: {IDS_SUFFIX} does not hold {dtype} ids "
            "(index and shard disagree on the dtype)"
        )
    data = p + 10 + (buf[p + 8] | (buf[p + 9] << 8))
    npy_size = data - p + num_tokens * dtype.itemsize
    j = p + (npy_size + BLOCK - 1) // BLOCK * BLOCK
    if buf[j : j + nk + 6] != kb + b".json\0":
        raise FormatError(f"{where}: sample {key!r}: expected member {key}.json at byte {j}")
    if check:
        _check_members(buf, offset, j, key, npy_size, num_tokens, dtype, where)
    try:
        jsize = int(bytes(buf[j + 124 : j + 135]), 8)
    except ValueError:
        raise FormatError(f"{where}: sample {key!r}: corrupt tar header of {key}.json") from None
    if j + BLOCK + (jsize + BLOCK - 1) // BLOCK * BLOCK != end:
        raise FormatError(
            f"{where}: sample {key!r}: member sizes do not add up to the indexed length {length}"
        )
    try:
        doc = _json_raw_decode(str(buf[j + BLOCK : j + BLOCK + jsize], "utf-8"))[0]
        spans = doc["supervised"]
        meta = doc.get("meta", {})
    except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
        raise FormatError(f"{where}: sample {key!r}: bad JSON member: {e!r}") from None
    if check or not _spans_ok(spans, num_tokens):  # bad spans would corrupt or crash labels
        check_spans(spans, num_tokens, f"{where}: sample {key!r}")
    return np.frombuffer(buf, dtype=dtype, count=num_tokens, offset=data), spans, meta


def decode_sample(
    buf, offset: int, length: int, key: str, num_tokens: int, dtype: np.dtype, where: str, check: bool = False
) -> dict:
    """The sample at ``buf[offset]`` as a dict: ``__key__``, ``input_ids`` (read-only view),
    ``labels`` (int64, -100 where not supervised), ``meta``, ``num_supervised``."""
    ids, spans, meta = decode_ids_spans(buf, offset, length, key, num_tokens, dtype, where, check)
    labels = spans_to_labels(ids, spans)
    return {
        "__key__": key,
        "input_ids": ids,
        "labels": labels,
        "meta": meta,
        "num_supervised": num_in_spans(spans),
    }


def _descr(dtype: np.dtype) -> bytes:
    """The start of the .npy header ``numpy.save`` writes for a 1-D array of ``dtype``."""
    return f"{{'descr': '{np.dtype(dtype).str}'".encode("ascii")


_json_raw_decode = json.JSONDecoder().raw_decode  # no trailing-whitespace scan of json.loads
_json_scan = json.scanner.make_scanner(json.JSONDecoder())  # type: ignore[arg-type]  # (obj, end)


# --- many samples of one buffer at once ----------------------------------------------------


def key_table(keys: Sequence[str]) -> tuple:
    """``(names, key_lengths, ids_mask, json_mask)`` for ``decode_block``: every sample's JSON
    member name ``KEY.json\\0`` as one zero-padded ``uint8`` row of whole 8-byte words, and, per
    row, the ``uint64`` masks of the bytes that name ``KEY.`` (the start of the ids member's name)
    and ``KEY.json\\0`` (compared a word at a time). Build it once per shard index (keys are
    encoded once, not per read)."""
    n = len(keys)
    try:
        enc = np.array(keys, dtype="S") if n else np.zeros(0, "S1")  # ASCII keys, at C speed
    except UnicodeEncodeError:
        enc = np.array([k.encode("utf-8") for k in keys], dtype="S")
    klen = np.char.str_len(enc).astype(np.int64) if n else np.zeros(0, np.int64)
    w = enc.dtype.itemsize
    table = np.zeros((n, (w + 6 + 7) // 8 * 8), np.uint8)
    table[:, :w] = enc.view(np.uint8).reshape(n, w)
    rows = np.arange(n)
    for c, ch in enumerate(b".json\0"):
        table[rows, klen + c] = ch
    col = np.arange(table.shape[1])
    ids_mask = np.where(col <= klen[:, None], 0xFF, 0).astype(np.uint8).view("<u8")
    json_mask = np.where(col < klen[:, None] + 6, 0xFF, 0).astype(np.uint8).view("<u8")
    return table, klen, ids_mask, json_mask


def _words(pattern: bytes, care: bytes) -> tuple:
    """``(expected, mask)`` little-endian ``uint64`` words: ``care`` marks the bytes compared."""
    return np.frombuffer(pattern, "<u8"), np.frombuffer(care, "<u8")


# a sample's first tar header and npy header, words 32 and 64-67 of it (bytes 256-263, 512-543):
# "ustar" at 257, the npy magic at 512, the header length at 520 (read, not compared), then
# the header text, which starts with the dtype ("{'descr': '<u2'": 15 bytes for every dtype)
_H1_WORDS = np.array([32, 64, 65, 66, 67], np.int64)
_H1_CARE = (
    b"\0\xff\xff\xff\xff\xff\0\0" + b"\xff" * 6 + b"\0\0" + b"\0\0" + b"\xff" * 14 + b"\xff" + b"\0" * 7
)


_H1_CACHE: dict = {}


def _h1_expected(dtype: np.dtype) -> tuple:
    """``_words`` of what ``_H1_WORDS`` of a sample of ``dtype`` hold."""
    got = _H1_CACHE.get(dtype.str)
    if got is None:
        d = _descr(dtype)  # 15 bytes for every dtype: "{'descr': '<u2'"
        exp = b"\0ustar\0\0" + _NPY_MAGIC + b"\0\0" + b"\0\0" + d + b"\0" * (24 - 2 - len(d))
        got = _H1_CACHE[dtype.str] = _words(exp, _H1_CARE)
    return got


_JSON_WORDS = np.arange(7, dtype=np.int64)  # a JSON member's first 56 bytes
_SIZE_WORDS = np.array([15, 16], np.int64)  # bytes 120-135 of a tar header: the size field


_OCTAL = 8 ** np.arange(10, -1, -1, dtype=np.int64)
# the JSON member as the writer writes it for one supervised span: {"supervised":[[S,E]],"meta":M}
_JSON_HEAD = np.frombuffer(b'{"supervised":[[', "<u8")  # two words
_JSON_MID = np.frombuffer(b']],"meta":', np.uint8)
_NUM_MAX = 12  # digits of a span bound read by the vectorized parse (longer: the scanner's)
_WIN = np.arange(2 * _NUM_MAX + 2, dtype=np.int64)  # "S,E]": the two bounds and the byte after
_POW10 = 10 ** np.arange(_NUM_MAX, dtype=np.int64)


def _one_span_members(g: np.ndarray, jsize: np.ndarray, nt: np.ndarray) -> tuple:
    """Vectorized parse of JSON members of the form ``{"supervised":[[S,E]],"meta":M}`` (no
    whitespace, S and E decimal integers without leading zeros, ``0 <= S < E <= n``), given
    ``g``, each member's first 56 bytes as 7 ``uint64`` words, and the member sizes.

    Returns ``(match, plain, s, e, meta_at)``: per member, whether it has that form up to ``M``
    (the caller checks that ``M`` fills the member up to its closing ``}`` and parses it),
    whether ``M`` is ``{}`` and the member ends there (nothing left to check or parse), the
    span, and where ``M`` starts in the member. Bytes past a member's size are never trusted:
    a member must reach past every byte its match used."""
    match = (g[:, 0] == _JSON_HEAD[0]) & (g[:, 1] == _JSON_HEAD[1])
    b = g.view(np.uint8)
    win = b[:, 16 : 16 + _WIN.size]
    digit = (win - 48) < 10  # uint8: bytes below "0" wrap around
    comma = win == 44
    close = win == 93  # "]"
    c = comma.argmax(1)  # the first comma, the first "]"
    t = close.argmax(1)
    rows = np.arange(g.shape[0])
    # "S,E]": one comma, digits on both sides of it, nothing else before the "]"
    match &= comma[rows, c] & close[rows, t] & (c >= 1) & (t >= c + 2)
    match &= (digit | (_WIN == c[:, None]) | (_WIN >= t[:, None])).all(1)
    match &= (c <= _NUM_MAX) & (t - c - 1 <= _NUM_MAX)
    # JSON numbers have no leading zeros (the scanner refuses "01": the exact path decides)
    second = win[rows, np.minimum(c + 1, _WIN.size - 1)]
    match &= ((win[:, 0] != 48) | (c == 1)) & ((second != 48) | (t == c + 2))
    at = 16 + t
    match &= (np.take_along_axis(b, at[:, None] + np.arange(_JSON_MID.size), 1) == _JSON_MID).all(1)
    meta_at = at + _JSON_MID.size
    match &= meta_at < jsize - 1
    tail = np.take_along_axis(b, meta_at[:, None] + np.arange(3), 1)
    plain = match & (jsize == meta_at + 3) & (tail == np.frombuffer(b"{}}", np.uint8)).all(1)
    # the bounds: digit k of a number of m digits weighs 10 ** (m - 1 - k)
    val = win.astype(np.int64) - 48
    exp = np.where(_WIN < c[:, None], c[:, None], t[:, None]) - 1 - _WIN
    val *= _POW10.take(exp, mode="clip")
    val[(exp < 0) | ~digit] = 0
    cum = val.cumsum(1)
    s = cum[rows, c]
    e = cum[rows, t] - s
    good = (s < e) & (e <= nt)
    return match & good, plain & good, s, e, meta_at


def decode_block(
    buf,
    offsets,
    lengths,
    keys: Sequence[str],
    num_tokens,
    dtype: np.dtype,
    where: str = "",
    names: Optional[tuple] = None,
) -> tuple:
    """Decode many samples of one buffer in one call: what ``decode_ids_spans`` returns for each
    sample, with the same checks, at a fraction of the per-sample cost.

    ``offsets`` (of each sample's first tar header in ``buf``), ``lengths``, ``keys`` and
    ``num_tokens`` are the index columns of the samples (sequences or int64 arrays); ``names`` is
    ``key_table(keys)`` (computed here when not given). The tar and npy headers of all samples
    are checked with a few vectorized gathers, JSON members of the writer's one-span form are
    parsed by vectorized byte compares (the others by the JSON scanner, from one decoded string),
    and ids are slices of one typed view of ``buf``.

    Returns ``(ids, spans, metas, errors)``: lists with one entry per sample, and ``errors``, a
    dict ``{i: FormatError}`` for the samples that do not decode (their list entries are None;
    each error is exactly the one ``decode_ids_spans`` raises for that sample). Samples that fail
    a fast check (or whose JSON members are not valid UTF-8 together) are decoded one by one by
    ``decode_ids_spans``, so the results never depend on the fast path. Labels are left to the
    caller (``spans_to_labels``), so they can be built into recycled memory sample by sample.
    """
    return decode_block_parts(buf, offsets, lengths, keys, num_tokens, dtype, where, names)[:4]


def decode_block_parts(
    buf,
    offsets,
    lengths,
    keys: Sequence[str],
    num_tokens,
    dtype: np.dtype,
    where: str = "",
    names: Optional[tuple] = None,
    spans_lists: bool = True,
) -> tuple:
    """:func:`decode_block`, plus what a reader needs to build every sample's labels with a few
    array operations: ``(ids, spans, metas, errors, typed, first, span_start, span_end)``.

    ``typed`` is the view of ``buf`` as ``dtype`` that ids are slices of; ``first`` (int64)
    holds each sample's ``typed`` position of its first id (-1 where its ids are not such a slice,
    or it did not decode); ``span_start``/``span_end`` (int64) its supervised span where that is
    one span read by the vectorized parse (-1 elsewhere: its ``spans`` entry says)."""
    dtype = np.dtype(dtype)
    n = len(keys)
    errors: dict = {}
    minus = np.full(n, -1, np.int64)
    if n == 0:
        return [], [], [], errors, np.zeros(0, dtype), minus, minus, minus
    off = np.asarray(offsets, dtype=np.int64)
    ln = np.asarray(lengths, dtype=np.int64)
    nt = np.asarray(num_tokens, dtype=np.int64)
    if names is None or len(names) < 4:
        names = key_table(keys)
    table, _, ids_mask, json_mask = names
    size = len(memoryview(buf).cast("B")) if not isinstance(buf, np.ndarray) else buf.nbytes
    # (a buffer too short for any sample: every sample goes to the exact path, for its error)
    u8 = np.frombuffer(buf if size >= 8 else bytes(8), np.uint8)
    w64 = np.frombuffer(u8, "<u8", count=len(u8) // 8)
    isz = dtype.itemsize
    end = off + ln
    name = table.view("<u8")
    wn = name.shape[1]
    # tar headers start on 512-byte blocks: every check below compares whole 8-byte words,
    # gathered with mode="clip" (inside buf); a sample passes only if all its bytes are in buf
    # (the size check), so a clipped read never lets a bad sample through
    ok = (off >= 0) & (end <= size) & (off % BLOCK == 0)
    exp1, care1 = _h1_expected(dtype)
    g = w64.take((off >> 3)[:, None] + np.concatenate([np.arange(wn), _H1_WORDS]), mode="clip")
    ok &= ~((g[:, :wn] ^ name) & ids_mask).any(1)  # "KEY."
    ok &= ~((g[:, wn:] ^ exp1) & care1).any(1)  # ustar, npy magic, dtype
    data = off + (BLOCK + 10) + (g[:, wn + 2] & 0xFFFF).astype(np.int64)
    j = off + BLOCK + (data - off - BLOCK + nt * isz + BLOCK - 1) // BLOCK * BLOCK
    g = w64.take((j >> 3)[:, None] + np.concatenate([np.arange(wn), _SIZE_WORDS]), mode="clip")
    ok &= ~((g[:, :wn] ^ name) & json_mask).any(1)  # "KEY.json\0"
    digits = np.ascontiguousarray(g[:, wn:]).view(np.uint8)[:, 4:15] - 48  # 11 octal digits
    ok &= (digits < 8).all(1)
    jsize = digits.astype(np.int64) @ _OCTAL
    jstart = j + BLOCK
    jend = jstart + jsize
    ok &= (jstart + (jsize + BLOCK - 1) // BLOCK * BLOCK == end) & (nt >= 0)
    aligned = data % isz == 0
    ok &= aligned  # ids are slices of one typed view of buf
    typed = np.frombuffer(buf, dtype=dtype, count=size // isz)
    first = np.where(aligned, data // isz, -1)
    ids_out: list = [None] * n
    spans_out: list = [None] * n
    meta_out: list = [None] * n

    # the writer's one-span members, parsed in place (a meta other than {} by the JSON scanner)
    g = w64.take((jstart >> 3)[:, None] + _JSON_WORDS, mode="clip")
    match, plain, s1, e1, meta_at = _one_span_members(g, jsize, nt)
    match &= ok
    plain &= ok
    mstart = jstart + meta_at
    scan = _json_scan
    if plain.all():  # the common case: every sample of the block
        xs = first.tolist()
        ids_out = [typed[x:y] for x, y in zip(xs, (first + nt).tolist())]
        meta_out = [{} for _ in xs]
        if spans_lists:
            spans_out = np.stack([s1, e1], 1)[:, None, :].tolist()
        return ids_out, spans_out, meta_out, errors, typed, first, s1, e1
    match &= u8.take(jend - 1, mode="clip") == 125  # "}": the member ends with the document
    for i in match.nonzero()[0].tolist():
        if plain[i]:
            meta: Any = {}
        else:
            mtext = ""
            try:
                mtext = str(buf[int(mstart[i]) : int(jend[i]) - 1], "utf-8")
                meta, q = scan(mtext, 0)
            except (StopIteration, ValueError):
                q = -1
            if q != len(mtext):
                match[i] = False  # the scanner's, below
                continue
        x = int(first[i])
        ids_out[i] = typed[x : x + int(nt[i])]
        spans_out[i] = [[int(s1[i]), int(e1[i])]]
        meta_out[i] = meta
    s1 = np.where(match, s1, -1)
    e1 = np.where(match, e1, -1)
    rest = ok & ~match

    # one string holding every other JSON member that passed, parsed value by value at known
    # positions: a value must end exactly where its member ends
    sel = rest.nonzero()[0]
    text: Optional[str] = ""
    ends: list = []
    if sel.size:
        js, je = jstart[sel].tolist(), jend[sel].tolist()
        raw = b"".join([buf[x:y] for x, y in zip(js, je)])
        ends_a = np.cumsum(jsize[sel])
        if raw.isascii():
            text = raw.decode("ascii")
        else:  # positions in the str: bytes before each end minus the UTF-8 continuation bytes
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = None
            cont = np.zeros(len(raw) + 1, np.int64)
            np.cumsum((np.frombuffer(raw, np.uint8) & 0xC0) == 0x80, out=cont[1:])
            ends_a = ends_a - cont[ends_a]
        ends = ends_a.tolist()
    xs, ys = first[sel].tolist(), (first + nt)[sel].tolist()
    sel_l = sel.tolist()
    slow = [] if text is not None else sel_l
    if text is not None:
        p, spans_ok = 0, _spans_ok
        for i, q, x, y in zip(sel_l, ends, xs, ys):
            try:
                doc, e = scan(text, p)
            except (StopIteration, ValueError):
                doc = e = None
            p = q
            if e != q or type(doc) is not dict:
                slow.append(i)
                continue
            spans = doc.get("supervised")
            if not spans_ok(spans, y - x):
                slow.append(i)
                continue
            ids_out[i] = typed[x:y]
            spans_out[i] = spans
            meta_out[i] = doc.get("meta", {})
    if not ok.all():
        slow.extend((~ok).nonzero()[0].tolist())
    if slow and isinstance(buf, np.ndarray):
        buf = memoryview(buf)  # type: ignore[arg-type]  # sliced and compared like bytes
    for i in slow:  # the exact path: a sample that decodes there is used, else its error
        try:
            ids_out[i], spans_out[i], meta_out[i] = decode_ids_spans(
                buf, int(offsets[i]), int(lengths[i]), keys[i], int(num_tokens[i]), dtype, where
            )
        except FormatError as e:
            errors[i] = e
    if errors:
        first[list(errors)] = -1
    return ids_out, spans_out, meta_out, errors, typed, first, s1, e1


def _check_members(buf, offset, j, key, npy_size, num_tokens, dtype, where) -> None:
    w = f"{where}: sample {key!r}"
    name, size = parse_tar_header(bytes(buf[offset : offset + BLOCK]), w)
    if name != f"{key}.{IDS_SUFFIX}" or size != npy_size:
        raise FormatError(
            f"{w}: member {name!r} of {size} bytes does not match the index ({num_tokens} tokens of {dtype})"
        )
    _check_npy_header(
        bytes(buf[offset + BLOCK : offset + BLOCK + npy_size - num_tokens * dtype.itemsize]),
        num_tokens,
        dtype,
        w,
    )
    parse_tar_header(bytes(buf[j : j + BLOCK]), w)


def _check_npy_header(raw: bytes, n: int, dtype: np.dtype, where: str) -> None:
    try:
        f = io.BytesIO(raw)
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, fortran, dt = read(f)  # parses the header dict only; never unpickles
    except Exception as e:  # noqa: BLE001 - any parse failure is a format error
        raise FormatError(f"{where}: bad .npy header: {e}") from None
    if shape != (n,) or dt != dtype or fortran:
        raise FormatError(f"{where}: .npy holds {dt} {shape}, the index says {dtype} ({n},)")
