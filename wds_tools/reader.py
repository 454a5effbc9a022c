"""Read format-v1 datasets: manifests, shard indexes and shards, local or remote.

The shard index gives every sample's byte offset and length, so the reader never parses tar
members generically: it reads a run of samples with one sequential (ranged) read and decodes
each in place. Nothing is unpickled; members other than ``.input_ids.npy`` and ``.json`` are
never decoded.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union

import braceexpand
import numpy as np

from . import io as wio
from .contract import index_columns, is_count, sha256_url, short_repr
from .format import (
    BLOCK,
    IDS_SUFFIX,
    IGNORE_INDEX,
    FormatError,
    check_version,
    decode_block_parts,
    decode_sample,
    key_table,
    num_in_spans,
    padded,
    parse_tar_header,
    shard_index_name,
    spans_to_labels,
)

__all__ = ["Shard", "ReadStats", "load_manifest", "open_shards", "iter_samples", "iter_tar", "expand_urls"]

log = logging.getLogger(__name__)
CHUNK_BYTES = 1 << 20
_LABEL_POOL = 4
LABEL_CHUNK = 1 << 16  # ids per chunk of labels built at once (512 KiB of int64)
# mean unsupervised run (tokens) from which -100 is written a slice per run, not a scatter per
# position (callgrind, 2,400-token samples: scatter wins at 60-token prompts, slices at 600;
# break-even about 170)
_RUN_SLICE = 160
_PIECE_POOL = 3


def expand_urls(spec: Union[str, Sequence[str]]) -> List[str]:
    """Brace-expand one pattern or a list of them (``shard-r{00000..00003}-000000.tar``)."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    return [u for s in specs for u in braceexpand.braceexpand(s)]


def load_manifest(
    url: str, opts: wio.IOOptions = wio.DEFAULT, *, allow_outside_root: Optional[bool] = None
) -> Dict[str, Any]:
    """The dataset manifest at ``url``, version-checked, shard URLs resolved to absolute.

    Every ``path``/``index`` entry must be relative and stay inside the manifest's folder: a
    URL (``https://``, ``s3://``, ``file://``, ``pipe:``), a ``..`` that climbs out or an
    absolute path is refused with a FormatError naming the entry. ``allow_outside_root``:
    ``True`` accepts all of them; ``False`` refuses all of them; ``None`` (default) refuses
    all but absolute paths named by a *local* manifest (accepted for compatibility with
    hand-written local manifests, with a warning).
    """
    where = wio.redact(url)
    doc = _read_doc(url, opts)
    check_version(doc, where)
    if doc.get("kind") != "manifest":
        raise FormatError(f"{where}: not a dataset manifest (kind={doc.get('kind')!r})")
    shards = doc.get("shards")
    if not isinstance(shards, list):
        raise FormatError(f"{where}: manifest 'shards' must be a list")
    warned: list = []
    for i, s in enumerate(shards):
        at = f"{where}: shards[{i}]"
        if not isinstance(s, dict):
            raise FormatError(f"{at}: must be an object with 'path' and 'index'")
        for k in ("num_samples", "num_tokens", "bytes"):
            if k in s and not is_count(s[k]):
                raise FormatError(f"{at}.{k}: must be a non-negative integer, got {short_repr(s[k])}")
        s["url"] = _join_entry(url, s.get("path"), f"{at}.path", allow_outside_root, warned)
        s["index_url"] = _join_entry(url, s.get("index"), f"{at}.index", allow_outside_root, warned)
    for k in ("num_samples", "num_tokens"):
        if k in doc and not is_count(doc[k]):
            raise FormatError(
                f"{where}: manifest {k!r} must be a non-negative integer, got {short_repr(doc[k])}"
            )
    return doc


def _read_doc(url: str, opts: wio.IOOptions) -> Any:
    """``wio.read_json``, with a document that is not JSON (or not UTF-8) as a FormatError."""
    try:
        return wio.read_json(url, opts)
    except (FormatError, OSError):
        raise
    except ValueError as e:
        raise FormatError(
            f"{wio.redact(url)}: not a JSON document: {' '.join(wio.scrub(str(e)).split())}"
        ) from None


def _join_entry(
    base: str, rel: Any, at: str, allow_outside_root: Optional[bool], warned: Optional[list] = None
) -> str:
    """``rel`` (a manifest or index entry) resolved against ``base``; refuses an entry that
    leaves ``base``'s folder (see :func:`load_manifest` for ``allow_outside_root``)."""
    if not isinstance(rel, str) or not rel or "\0" in rel:
        raise FormatError(f"{at}: must be a non-empty relative path, got {short_repr(rel)}")
    if not allow_outside_root:
        import posixpath

        norm = posixpath.normpath(rel.replace("\\", "/"))
        absolute = rel.startswith("/") and "://" not in rel
        if (
            allow_outside_root is None
            and absolute
            and not wio.is_remote(base)
            and not base.startswith("pipe:")
        ):
            if warned is not None and not warned:
                warned.append(True)
                log.warning(
                    "%s: absolute path in a local manifest accepted (pass "
                    "allow_outside_root=False to refuse)",
                    at,
                )
        elif (
            "://" in rel
            or rel.startswith(("pipe:", "/", "~"))
            or os.path.isabs(rel)
            or re.match(r"^[A-Za-z]:", rel)
            or norm == ".."
            or norm.startswith("../")
        ):
            raise FormatError(
                f"{at}: {short_repr(rel)} leaves the dataset folder (absolute path, URL, pipe: or "
                "'..'); entries must be relative paths inside the folder of the file naming them "
                "(pass allow_outside_root=True to accept it)"
            )
    try:
        return wio.join_url(base, rel)
    except ValueError as e:
        raise FormatError(f"{at}: {e}") from None


def _take_buffer(pool: List[np.ndarray], size: int, dtype: Any, least: int, keep: int) -> np.ndarray:
    """A buffer of at least ``size`` items from ``pool``, reused only once nothing but the pool
    refers to it (no view of it is left with the caller); else a fresh one of ``max(size,
    least)`` items, which replaces the pool's oldest entry once the pool holds ``keep``. Warm
    memory saves the page faults of a fresh allocation per use."""
    refs = sys.getrefcount
    for k in range(len(pool)):
        if refs(pool[k]) == 2 and len(pool[k]) >= size:  # 2: the pool and the argument
            return pool[k]
    mem = np.empty(max(size, least), dtype)
    if len(pool) >= keep:
        del pool[0]
    pool.append(mem)
    return mem


def _block_labels(
    ids: list, spans: list, typed: np.ndarray, first, nt, s1, e1, k: int, pool: List[np.ndarray]
) -> tuple:
    """``(labels, num_supervised)`` of samples ``0..k-1`` of a decoded block
    (``format.decode_block_parts``): int64 labels, the ids with -100 outside the supervised
    spans. A chunk of samples (about ``LABEL_CHUNK`` ids) at a time is cast into one recycled
    buffer with a single copy, its -100 positions written with one scatter; each sample's
    labels are a view of it (the buffer is reused only once no view is left). A chunk stays in
    the CPU cache, and the per-sample cost is one slice instead of several array calls."""
    if k == 0:
        return iter(()), []
    x0 = first[:k]
    single = s1[:k] >= 0
    if (x0 < 0).any() or (k > 1 and (x0[1:] < x0[:-1]).any()):
        # ids that are not slices of the typed view (odd .npy header length), or an index that
        # lists the samples of a piece out of their order in the shard: label by label
        labels = [
            spans_to_labels(x, sp if s < 0 else [[s, e]])
            for x, sp, s, e in zip(ids[:k], spans, s1.tolist(), e1.tolist())
        ]
        return iter([labels]), [int((lab != IGNORE_INDEX).sum()) for lab in labels]
    x1 = x0 + nt
    if single.all():  # the unsupervised ranges: [x, x + s) and [x + e, x + n) per sample
        rs = np.empty(2 * k, np.int64)
        re_ = np.empty(2 * k, np.int64)
        rs[0::2], re_[0::2] = x0, x0 + s1[:k]
        rs[1::2], re_[1::2] = x0 + e1[:k], x1
        nsup = (e1[:k] - s1[:k]).tolist()
    else:
        rl: list = []
        el: list = []
        nsup = []
        for x, y, s, e, sp in zip(x0.tolist(), x1.tolist(), s1.tolist(), e1.tolist(), spans):
            prev, sup = x, 0
            for a, b in [[s, e]] if s >= 0 else sp:
                rl.append(prev)
                el.append(x + a)
                prev = x + b
                sup += b - a
            rl.append(prev)
            el.append(y)
            nsup.append(sup)
        rs, re_ = np.array(rl, np.int64), np.array(el, np.int64)
    lens = re_ - rs
    # chunks of whole samples: a new chunk starts where the ids pass a LABEL_CHUNK boundary
    cid = (x0 - x0[0]) // LABEL_CHUNK
    cut = [0, *(np.flatnonzero(cid[1:] != cid[:-1]) + 1).tolist(), k]
    live = lens > 0
    runs = int(live.sum())
    if runs and int(lens.sum()) >= _RUN_SLICE * runs:
        # long unsupervised runs (a prompt of hundreds of tokens): one slice each is cheaper
        # than scattering every position (a scatter costs per position, a slice per run)
        rs, re_ = rs[live], re_[live]
        rb = [*np.searchsorted(rs, x0[cut[:-1]]).tolist(), runs]
        rl, el = rs.tolist(), re_.tolist()

        def mark(lab: np.ndarray, c: int, lo: int) -> None:
            for r in range(rb[c], rb[c + 1]):
                lab[rl[r] - lo : el[r] - lo] = IGNORE_INDEX

    else:  # short runs: every unsupervised position, one scatter per chunk
        cum = np.cumsum(lens)
        fill = np.arange(int(cum[-1]), dtype=np.int64) + np.repeat(rs - (cum - lens), lens)
        lo_hi = np.searchsorted(fill, np.stack([x0[cut[:-1]], x1[np.array(cut[1:]) - 1]])).tolist()

        def mark(lab: np.ndarray, c: int, lo: int) -> None:
            lab[fill[lo_hi[0][c] : lo_hi[1][c]] - lo] = IGNORE_INDEX

    return _chunk_labels(typed, cut, x0.tolist(), x1.tolist(), pool, mark), nsup


def _chunk_labels(
    typed: np.ndarray, cut: list, xs: list, ys: list, pool: List[np.ndarray], mark
) -> Iterator[list]:
    """The labels of :func:`_block_labels`, one chunk's list at a time: a chunk is built only
    when the previous one has been handed out, so its buffer is usually free again.
    ``mark(lab, c, lo)`` writes -100 over chunk ``c``'s unsupervised positions (``lab[0]`` is
    id ``lo``)."""
    copyto, int64 = np.copyto, np.int64
    for c in range(len(cut) - 1):
        c0, c1 = cut[c], cut[c + 1]
        lo, hi = xs[c0], ys[c1 - 1]
        lab = _take_buffer(pool, hi - lo, int64, LABEL_CHUNK + (LABEL_CHUNK >> 2), _LABEL_POOL)
        lab = lab[: hi - lo]
        copyto(lab, typed[lo:hi], casting="unsafe")
        mark(lab, c, lo)
        out = [lab[x - lo : y - lo] for x, y in zip(xs[c0:c1], ys[c0:c1])]
        del lab  # only the samples' views keep the buffer in use
        yield out


@dataclass
class Shard:
    """One shard and its index: random access by position, sequential runs by range."""

    url: str
    index: Dict[str, Any]
    opts: wio.IOOptions = field(default=wio.DEFAULT, repr=False)

    def __post_init__(self) -> None:
        self.where = wio.redact(self.url)
        self._arrays = index_columns(self.index, self.where)
        cols = self.index["samples"]
        self.keys: List[str] = cols["key"]
        self.offsets: List[int] = cols["offset"]
        self.lengths: List[int] = cols["length"]
        self.num_tokens: List[int] = cols["num_tokens"]
        self.num_supervised: List[int] = cols["num_supervised"]
        self.dtype = np.dtype(self.index["dtype"])
        vocab = self.index.get("vocab_size")
        # ids >= vocab_size can only be stored when the dtype holds more values than the
        # vocabulary (a uint16 shard of a 65,536 vocabulary needs no check)
        self.vocab_limit: Optional[int] = (
            vocab if vocab is not None and vocab <= int(np.iinfo(self.dtype).max) else None
        )
        if not (
            len(self.keys)
            == len(self.offsets)
            == len(self.lengths)
            == len(self.num_tokens)
            == len(self.num_supervised)
            == self.index["num_samples"]
        ):
            raise FormatError(f"{self.where}: index columns disagree with num_samples")

    @classmethod
    def open(cls, url: str, index_url: Optional[str] = None, opts: wio.IOOptions = wio.DEFAULT) -> "Shard":
        """Open ``url`` (a ``.tar``) with its index (default: ``X.idx.json`` beside it)."""
        index_url = index_url or wio.join_url(url, shard_index_name(os.path.basename(url)))
        try:
            index = wio.read_json(index_url, opts)
        except FileNotFoundError:
            raise FormatError(
                f"{wio.redact(url)}: no shard index {os.path.basename(index_url)} "
                "beside it (incomplete write, or not a wds-tokens shard)"
            ) from None
        except FormatError:
            raise
        except ValueError as e:  # not JSON
            raise FormatError(
                f"{wio.redact(index_url)}: unreadable shard index: {wio.scrub(str(e))}"
            ) from None
        check_version(index, wio.redact(index_url))
        return cls(url, index, opts)

    def verify_checksum(self) -> None:
        """Read the whole shard and compare its size and sha256 with the index; FormatError on
        a mismatch. The fast read path checks structure, not content: a flipped byte inside
        token ids or inside a JSON number decodes cleanly and is only caught here (or by
        ``wds-tools verify``)."""
        digest, n = sha256_url(self.url, self.opts)
        if n != self.index.get("bytes"):
            raise FormatError(
                f"{self.where}: {n} bytes, its index says {self.index.get('bytes')} "
                "(truncated or overwritten shard)"
            )
        if digest != self.index.get("sha256"):
            raise FormatError(f"{self.where}: sha256 mismatch with its index (corrupt shard)")

    def __len__(self) -> int:
        return len(self.keys)

    def _decode(self, buf, base: int, i: int) -> Dict[str, Any]:
        s = decode_sample(
            buf,
            self.offsets[i] - base,
            self.lengths[i],
            self.keys[i],
            self.num_tokens[i],
            self.dtype,
            self.where,
        )
        if self.vocab_limit is not None:
            errors: dict = {}
            self._check_vocab([s["input_ids"]], errors, i)
            if errors:
                raise errors[0]
        s["__shard__"], s["__index__"] = self.url, i
        return s

    def read(self, i: int) -> Dict[str, Any]:
        """Sample ``i`` by one byte-range read."""
        off, n = self.offsets[i], self.lengths[i]
        return self._decode(wio.read_range(self.url, off, off + n, self.opts), off, i)

    def columns(self) -> tuple:
        """``(offsets, lengths, num_tokens)`` as int64 arrays and ``key_table(keys)``: the
        index in the form ``format.decode_block`` takes, computed once per shard."""
        cols = self.__dict__.get("_columns")
        if cols is None:
            arrays = self._arrays  # built when the index was checked

            def col(name: str, values: List[int]) -> np.ndarray:
                got = arrays.get(name)
                return got if got is not None else np.asarray(values, np.int64)

            cols = self._columns = (
                col("offset", self.offsets),
                col("length", self.lengths),
                col("num_tokens", self.num_tokens),
                key_table(self.keys),
            )
        return cols

    def decode_block(self, buf, base: int, a: int, b: int) -> tuple:
        """``format.decode_block`` of samples ``a..b-1``, whose bytes start at ``buf[0]`` =
        byte ``base`` of the shard."""
        return self.decode_parts(buf, base, a, b)[:4]

    def decode_parts(self, buf, base: int, a: int, b: int, spans_lists: bool = True) -> tuple:
        """``format.decode_block_parts`` of samples ``a..b-1`` (see :meth:`decode_block`),
        with the vocabulary check."""
        off, ln, nt, names = self.columns()
        out = decode_block_parts(
            buf,
            off[a:b] - base,
            ln[a:b],
            self.keys[a:b],
            nt[a:b],
            self.dtype,
            self.where,
            tuple(x[a:b] for x in names),
            spans_lists,
        )
        if self.vocab_limit is not None:
            self._check_vocab(out[0], out[3], a)
        return out

    def _check_vocab(self, ids: list, errors: dict, a: int) -> None:
        """A sample holding a token id >= vocab_size becomes an error (it would index past the
        embedding table); only runs when the dtype can hold such ids."""
        limit = self.vocab_limit
        if limit is None:
            return
        for k, x in enumerate(ids):
            if x is not None and len(x) and int(x.max()) >= limit:
                p = int(np.argmax(x >= limit))
                ids[k] = None
                errors[k] = FormatError(
                    f"{self.where}: sample {self.keys[a + k]!r}: token id {int(x[p])} at position "
                    f"{p} is outside the vocabulary (vocab_size {limit})"
                )

    def iter(
        self,
        start: int = 0,
        stop: Optional[int] = None,
        stats: Optional["ReadStats"] = None,
        _pool: Optional[List[np.ndarray]] = None,
        _label_pool: Optional[List[np.ndarray]] = None,
    ) -> Iterator[Dict[str, Any]]:
        """Samples ``start..stop-1`` through one sequential (ranged) read of their bytes,
        decoded a piece at a time (``format.decode_block``). ``stats`` (optional) counts the
        samples and tokens yielded.

        A stream that ends early raises FormatError after the last complete sample: a
        partial sample is never yielded.
        """
        keys, url, offsets, lengths = self.keys, self.url, self.offsets, self.lengths
        stats = stats if stats is not None else ReadStats()
        nts = self.columns()[2]
        label_pool = [] if _label_pool is None else _label_pool
        for buf, base, a, b in self._runs(start, stop, _pool):
            ids, spans, metas, errors, typed, first, s1, e1 = self.decode_parts(buf, base, a, b, False)
            k = min(errors) if errors else b - a
            chunks, nsup = _block_labels(ids, spans, typed, first, nts[a : a + k], s1, e1, k, label_pool)
            labels = chain.from_iterable(chunks)
            ntok = nts[a : a + k].tolist()
            for x, lab, meta, ns, n, i in zip(ids, labels, metas, nsup, ntok, range(a, a + k)):
                stats.samples += 1
                stats.tokens += n
                yield {
                    "__key__": keys[i],
                    "input_ids": x,
                    "labels": lab,
                    "meta": meta,
                    "num_supervised": ns,
                    "__shard__": url,
                    "__index__": i,
                }
            if errors:
                i = a + min(errors)
                if offsets[i] - base + lengths[i] > len(buf):
                    raise FormatError(
                        f"{self.where}: truncated shard: ends inside sample {keys[i]!r} "
                        f"(byte {base + len(buf)} of {self.index.get('bytes', '?')})"
                    )
                raise errors[i - a]

    def _runs(
        self, start: int, stop: Optional[int], pool: Optional[List[np.ndarray]] = None
    ) -> Iterator[tuple]:
        """``(buf, base, a, b)``: the bytes of samples ``a..b-1`` start at ``buf[0]`` = shard
        byte ``base``. One sequential (ranged) read, in pieces of whole samples of up to
        ``CHUNK_BYTES`` (one sample at least), each read into a read-only buffer (ids are views
        of it). A piece of about 1 MiB stays in the CPU cache while it is decoded and its labels
        built: measured faster than decoding from a memory map of the page cache.

        Piece memory is recycled like the labels: a buffer of ``pool`` (a list this read may
        share with earlier reads of the same thread) is reused only once nothing but the pool
        refers to it (no ids view of it is left), else a fresh one is taken; warm memory saves
        the page faults of a fresh megabyte per piece."""
        stop = len(self) if stop is None else min(stop, len(self))
        if start >= stop:
            return
        pool = [] if pool is None else pool
        refs = sys.getrefcount
        offsets, lengths = self.offsets, self.lengths
        end = offsets[stop - 1] + lengths[stop - 1]
        with wio.open_range(self.url, offsets[start], end, self.opts) as f:
            i = start
            while i < stop:
                j, total = i + 1, lengths[i]
                while j < stop and total + lengths[j] <= CHUNK_BYTES:
                    total += lengths[j]
                    j += 1
                mem = None
                for k in range(len(pool)):
                    # 2: the pool and the argument; every ids view of it (or of `buf`) adds one
                    if refs(pool[k]) == 2 and len(pool[k]) >= total:
                        mem = pool[k]
                        break
                if mem is None:
                    mem = np.empty(max(total, CHUNK_BYTES), np.uint8)
                    if len(pool) < _PIECE_POOL:
                        pool.append(mem)
                buf = mem[:total]
                del mem
                got = wio.readinto_full(f, buf)
                if got < total:
                    buf = buf[:got]
                buf.flags.writeable = False
                yield buf, offsets[i], i, j
                if got < total:
                    return
                i = j


@dataclass
class ReadStats:
    """What a read encountered; ``skipped_shards`` holds (url, reason) pairs."""

    samples: int = 0
    tokens: int = 0
    skipped_shards: List[tuple] = field(default_factory=list)


def open_shards(
    source: Union[str, Sequence[str]],
    opts: wio.IOOptions = wio.DEFAULT,
    *,
    allow_outside_root: Optional[bool] = None,
) -> List[Shard]:
    """Shards named by a manifest, a shard index, shard URLs or brace patterns of them.

    Entries of a manifest or index must stay inside its folder unless ``allow_outside_root``
    (see :func:`load_manifest`)."""
    shards: List[Shard] = []
    for item in _shard_sources(source, opts, allow_outside_root):
        shards.append(item())
    return shards


def _shard_sources(source, opts, allow_outside_root):
    """A callable per shard that opens it (so a caller can handle each shard's error)."""
    for url in expand_urls(source):
        if url.endswith(".json"):
            doc = _read_doc(url, opts)
            check_version(doc, wio.redact(url))
            if doc.get("kind") == "manifest":
                for s in load_manifest(url, opts, allow_outside_root=allow_outside_root)["shards"]:
                    yield _Opener(s["url"], s["index_url"], opts)
            elif doc.get("kind") == "shard_index":
                shard_url = _join_entry(
                    url, doc.get("shard"), f"{wio.redact(url)}: shard", allow_outside_root
                )
                yield lambda u=shard_url, d=doc: Shard(u, d, opts)
            else:
                raise FormatError(f"{wio.redact(url)}: unknown kind {doc.get('kind')!r}")
        else:
            yield _Opener(url, None, opts)


@dataclass
class _Opener:
    url: str
    index_url: Optional[str]
    opts: wio.IOOptions

    def __call__(self) -> Shard:
        return Shard.open(self.url, self.index_url, self.opts)


def iter_samples(
    source: Union[str, Sequence[str]],
    *,
    on_error: str = "fail",
    stats: Optional[ReadStats] = None,
    opts: wio.IOOptions = wio.DEFAULT,
    verify_checksums: bool = False,
    allow_outside_root: Optional[bool] = None,
) -> Iterator[Dict[str, Any]]:
    """Every sample of ``source`` in order: dicts with ``__key__``, ``input_ids`` (stored dtype,
    read-only), ``labels`` (int64, -100 where not supervised), ``meta``.

    ``on_error``: ``"fail"`` raises on a corrupt or truncated shard; ``"skip"`` logs a warning,
    records the shard in ``stats.skipped_shards`` and goes on with the next shard (samples
    already yielded from it stay; a partial sample is never yielded). A shard whose index is
    missing or unreadable, or (with ``verify_checksums``) whose sha256 does not match, is a
    bad shard under the same policy.

    ``verify_checksums``: hash each whole shard against its index before yielding from it (one
    extra read of the shard). Without it a flipped byte inside token ids or a JSON number is not
    detected by the read path (structure is checked, content is not); ``wds-tools verify`` is
    the tool for checking a dataset at rest.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError(f"on_error must be 'fail' or 'skip', got {on_error!r}")
    stats = stats if stats is not None else ReadStats()
    pool: List[np.ndarray] = []  # piece and label buffers shared by the shards of this read
    label_pool: List[np.ndarray] = []
    for opener in _shard_sources(source, opts, allow_outside_root):
        where = wio.redact(getattr(opener, "url", "") or "?")
        try:
            shard = opener()
            where = shard.where
            if verify_checksums:
                shard.verify_checksum()
            yield from shard.iter(stats=stats, _pool=pool, _label_pool=label_pool)
        except (FormatError, IOError) as e:
            if on_error == "fail":
                raise
            log.warning("skipping rest of shard: %s", e)
            stats.skipped_shards.append((where, str(e)))


def iter_tar(
    url: str, opts: wio.IOOptions = wio.DEFAULT, data: Optional[bytes] = None
) -> Iterator[Dict[str, Any]]:
    """Samples of a shard read without its index, by walking the tar headers.

    Slower than the indexed path; used by ``verify`` and for shards whose index is lost.
    ``data``: the shard's bytes when the caller already holds them (no second read of ``url``).
    Only ``KEY.input_ids.npy`` and ``KEY.json`` members are decoded (``numpy.load`` with
    ``allow_pickle=False`` and ``json``); any other member is skipped unread.
    """
    import io
    import json

    where = wio.redact(url)
    cur: Dict[str, Any] = {}
    with io.BytesIO(data) if data is not None else wio.open_range(url, 0, None, opts) as f:
        pos = 0
        while True:
            block = f.read(BLOCK)
            if len(block) == 0 or block == b"\0" * BLOCK or (len(block) < BLOCK and not block.strip(b"\0")):
                break
            name, size = parse_tar_header(block, f"{where} at byte {pos}")
            payload = f.read(padded(size))
            if len(payload) < size:
                raise FormatError(f"{where}: truncated tar: member {name!r} is cut short")
            payload = payload[:size]
            key, _, suffix = os.path.basename(name).partition(".")
            if cur and cur["__key__"] != key:
                yield _finish_tar_sample(cur, where)
                cur = {}
            cur.setdefault("__key__", key)
            cur.setdefault("__offset__", pos)
            if suffix == IDS_SUFFIX:
                try:
                    cur["input_ids"] = np.load(io.BytesIO(payload), allow_pickle=False)
                except Exception as e:  # noqa: BLE001 - numpy raises SyntaxError etc. on garbage
                    raise FormatError(
                        f"{where}: {name}: not a loadable .npy array: {type(e).__name__}: {e}"
                    ) from None
            elif suffix == "json":
                try:
                    cur["json"] = json.loads(payload)
                except ValueError as e:
                    raise FormatError(f"{where}: {name}: bad JSON: {e}") from None
            pos += BLOCK + padded(size)
            cur["__length__"] = pos - cur["__offset__"]
    if cur:
        yield _finish_tar_sample(cur, where)


def _finish_tar_sample(cur: Dict[str, Any], where: str) -> Dict[str, Any]:
    if "input_ids" not in cur or "json" not in cur:
        raise FormatError(
            f"{where}: sample {cur['__key__']!r} lacks its "
            f"{'input_ids.npy' if 'input_ids' not in cur else 'json'} member"
        )
    spans = cur["json"].get("supervised", [])
    return {
        "__key__": cur["__key__"],
        "__offset__": cur["__offset__"],
        "__length__": cur["__length__"],
        "input_ids": cur["input_ids"],
        "labels": spans_to_labels(cur["input_ids"], spans),
        "meta": cur["json"].get("meta", {}),
        "num_supervised": num_in_spans(spans),
    }
