"""What the viewer shows, read lazily: datasets (manifest, shard or shard index), their figures,
sample pages, searches and the mixture of a data config.

Counts from a manifest are exact and cost nothing beyond the manifest. Per-sample figures
(length histograms, images per sample, grid sizes) come from a bounded, evenly spaced sample of
shard indexes and, for image metadata, from the first samples of those shards; the pages say
how much was read. Shard indexes are opened on demand and kept in a small LRU, so a dataset of
millions of samples costs little more memory than its manifest.
"""

from __future__ import annotations

import collections
import json
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np

from .. import io as wio
from ..format import IGNORE_INDEX, FormatError
from ..reader import Shard, load_manifest, open_shards

__all__ = [
    "ViewError",
    "ShardEntry",
    "Dataset",
    "Overview",
    "SearchResult",
    "open_dataset",
    "open_source",
    "MixReport",
    "mix_report",
    "SEARCH_FIELDS",
]

SEARCH_FIELDS = ("key", "id", "source", "meta")


class ViewError(Exception):
    """A request the viewer answers with an HTTP error (``status``) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ShardEntry:
    """One shard as the manifest names it (counts are the manifest's)."""

    url: str
    index_url: Optional[str]
    num_samples: int
    num_tokens: int
    num_supervised: int
    bytes: int

    @property
    def name(self) -> str:
        return os.path.basename(wio.redact(self.url).rstrip("/"))


@dataclass
class Overview:
    """The overview figures of a dataset; ``*_shards`` / ``meta_samples`` say what was read."""

    lengths: np.ndarray  # tokens per sample, of every sample of the read shards
    supervised_frac: np.ndarray  # supervised / tokens per sample, same samples
    images_per_sample: Dict[int, int]  # from the metadata of ``meta_samples`` samples
    grids: Dict[str, int]  # "HxW" grid (in tokens) -> number of images
    meta_samples: int
    read_shards: int
    errors: List[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class SearchResult:
    rows: List[Dict[str, Any]]
    start: int  # first global sample number searched
    stop: int  # one past the last searched
    complete: bool  # the search reached the end of the dataset


def _meta_images(meta: Any) -> List[Dict[str, Any]]:
    ims = meta.get("images") if isinstance(meta, dict) else None
    return [im for im in ims if isinstance(im, dict)] if isinstance(ims, list) else []


def grid_label(im: Dict[str, Any]) -> str:
    """``"32x32"`` (rows x columns of image tokens) from an image block's metadata."""
    g = im.get("grid")
    if isinstance(g, list) and len(g) == 2:
        return f"{g[0]}x{g[1]}"
    if isinstance(im.get("h"), int) and isinstance(im.get("w"), int):
        return f"{im['h'] // 16}x{im['w'] // 16}"
    return "?"


class Dataset:
    """One dataset: exact totals from its manifest, shard indexes opened lazily (LRU)."""

    def __init__(
        self,
        name: str,
        source: str,
        entries: List[ShardEntry],
        doc: Dict[str, Any],
        opts: wio.IOOptions = wio.DEFAULT,
        *,
        cache_shards: int = 16,
        cache_samples: int = 200_000,
        stats_shards: int = 16,
        meta_bytes_per_shard: int = 1 << 20,
        stats_budget_s: float = 0.6,
        first: Optional[Shard] = None,
    ):
        self.name, self.source, self.entries, self.doc, self.opts = name, source, entries, doc, opts
        counts = np.fromiter((e.num_samples for e in entries), np.int64, len(entries))
        self.starts = np.concatenate(([0], np.cumsum(counts)))
        self.num_samples = int(self.starts[-1])
        self.num_tokens = int(doc.get("num_tokens", sum(e.num_tokens for e in entries)))
        self.num_supervised = int(doc.get("num_supervised", sum(e.num_supervised for e in entries)))
        self.bytes = int(doc.get("bytes", sum(e.bytes for e in entries)))
        # the LRU of shard indexes is bounded by shards and by samples (an index costs ~200
        # bytes of Python objects per sample: 16 indexes of 10,000 samples ~ 30 MB)
        self.cache_shards, self.cache_samples = max(1, cache_shards), cache_samples
        self.stats_shards = max(1, stats_shards)
        self.meta_bytes_per_shard, self.stats_budget_s = meta_bytes_per_shard, stats_budget_s
        self.index_reads = 0  # shard indexes fetched (tests check laziness with it)
        self._cache: "collections.OrderedDict[int, Shard]" = collections.OrderedDict()
        self._lock = threading.Lock()
        self._overview: Optional[Overview] = None
        self._overview_lock = threading.Lock()
        if first is not None:
            self._cache[0] = first

    # --- shards -------------------------------------------------------------------------------

    def shard(self, j: int, keep: bool = True) -> Shard:
        """Shard ``j`` with its index (fetched once, kept in the LRU when ``keep``)."""
        if not 0 <= j < len(self.entries):
            raise ViewError(404, f"no shard {j} in {self.name} ({len(self.entries)} shards)")
        with self._lock:
            sh = self._cache.get(j)
            if sh is not None:
                self._cache.move_to_end(j)
                return sh
        e = self.entries[j]
        sh = Shard.open(e.url, e.index_url, self.opts)
        with self._lock:
            self.index_reads += 1
            if keep:
                self._cache[j] = sh
                while len(self._cache) > 1 and (
                    len(self._cache) > self.cache_shards
                    or sum(len(c) for c in self._cache.values()) > self.cache_samples
                ):
                    self._cache.popitem(last=False)
        return sh

    def locate(self, g: int) -> Tuple[int, int]:
        """Global sample number -> (shard, position in the shard), by the manifest's counts."""
        if not 0 <= g < self.num_samples:
            raise ViewError(404, f"no sample {g} in {self.name} ({self.num_samples} samples)")
        j = int(np.searchsorted(self.starts, g, side="right")) - 1
        return j, g - int(self.starts[j])

    def _shard_at(self, g: int) -> Tuple[Shard, int, int]:
        j, i = self.locate(g)
        sh = self.shard(j)
        if i >= len(sh):
            raise ViewError(
                500,
                f"{sh.where}: its index holds {len(sh)} samples, the manifest "
                f"says {self.entries[j].num_samples}",
            )
        return sh, j, i

    def sample(self, g: int) -> Dict[str, Any]:
        """Sample ``g`` decoded (one ranged read), with where its bytes are."""
        sh, j, i = self._shard_at(g)
        s = sh.read(i)
        s.update(
            __g__=g,
            __shard_no__=j,
            __shard_name__=self.entries[j].name,
            __offset__=sh.offsets[i],
            __length__=sh.lengths[i],
        )
        return s

    def raw(self, g: int) -> Tuple[str, bytes]:
        """The bytes of sample ``g`` in its shard (its tar members), and a file name for them."""
        sh, _, i = self._shard_at(g)
        off, n = sh.offsets[i], sh.lengths[i]
        return f"{sh.keys[i]}.tar", wio.read_range(sh.url, off, off + n, self.opts)

    def rows(self, start: int, count: int) -> List[Dict[str, Any]]:
        """Table rows of samples ``start .. start+count-1``: index figures plus metadata (one
        ranged read per shard touched)."""
        out: List[Dict[str, Any]] = []
        g, stop = max(0, start), min(self.num_samples, start + count)
        while g < stop:
            j, i = self.locate(g)
            try:
                sh = self.shard(j)
                end = min(len(sh), i + stop - g)
                for s in sh.iter(i, end):
                    out.append(_row(s, g, self.entries[j].name))
                    g += 1
            except (FormatError, OSError) as e:
                out.append({"g": g, "error": wio.scrub(str(e))})
            g = max(g, int(self.starts[j + 1]))  # next shard (also past a short index)
        return out

    # --- figures ------------------------------------------------------------------------------

    def stats_order(self) -> List[int]:
        """The shards the overview reads: all of them, or ``stats_shards`` evenly spaced."""
        n = len(self.entries)
        if n <= self.stats_shards:
            return list(range(n))
        return sorted({int(round(k * (n - 1) / (self.stats_shards - 1))) for k in range(self.stats_shards)})

    def overview(self) -> Overview:
        """Figures from a bounded sample of shards (computed once, then cached)."""
        with self._overview_lock:
            if self._overview is None:
                self._overview = self._compute_overview()
            return self._overview

    def _compute_overview(self) -> Overview:
        t0 = time.perf_counter()
        lengths: List[np.ndarray] = []
        sup: List[np.ndarray] = []
        errors: List[str] = []
        read: List[int] = []
        per_sample: Dict[int, int] = collections.Counter()
        grids: Dict[str, int] = collections.Counter()
        meta_samples = 0
        for j in self.stats_order():
            if read and time.perf_counter() - t0 > self.stats_budget_s:
                break
            try:
                sh = self.shard(j, keep=False)  # only its columns are kept, as arrays
                nt = np.asarray(sh.num_tokens, np.int64)
                lengths.append(nt)
                sup.append(np.asarray(sh.num_supervised, np.int64) / np.maximum(nt, 1))
                read.append(j)
                n, total = 0, 0  # the first samples of the shard, up to a byte budget
                budget = self.meta_bytes_per_shard
                while n < len(sh) and (n == 0 or total + sh.lengths[n] <= budget):
                    total += sh.lengths[n]
                    n += 1
                for s in sh.iter(0, n):
                    ims = _meta_images(s["meta"])
                    per_sample[len(ims)] += 1
                    for im in ims:
                        grids[grid_label(im)] += 1
                    meta_samples += 1
            except (FormatError, OSError) as e:
                errors.append(wio.scrub(str(e)))
        cat = np.concatenate if lengths else (lambda _: np.zeros(0, np.int64))
        return Overview(
            lengths=cat(lengths),
            supervised_frac=cat(sup) if sup else np.zeros(0),
            images_per_sample=dict(sorted(per_sample.items())),
            grids=dict(sorted(grids.items(), key=lambda kv: -kv[1])),
            meta_samples=meta_samples,
            read_shards=len(read),
            errors=errors,
            seconds=time.perf_counter() - t0,
        )

    # --- search -------------------------------------------------------------------------------

    def search(
        self,
        query: str,
        field: str,
        start: int = 0,
        max_results: int = 100,
        budget_s: float = 2.0,
        budget_bytes: int = 64 << 20,
    ) -> SearchResult:
        """Samples from ``start`` on whose key (substring), metadata ``id`` or ``source``
        (substring of the value) or whole metadata JSON (substring) matches ``query``.

        Bounded: it stops after ``max_results`` matches, ``budget_s`` seconds or (for metadata
        fields, which need the samples' bytes) ``budget_bytes`` bytes read, and says where it
        stopped so the caller can continue from there."""
        if field not in SEARCH_FIELDS:
            raise ViewError(400, f"search field must be one of {', '.join(SEARCH_FIELDS)}")
        t0, g, nbytes = time.perf_counter(), max(0, start), 0
        rows: List[Dict[str, Any]] = []
        while g < self.num_samples and len(rows) < max_results:
            if g > start and (time.perf_counter() - t0 > budget_s or nbytes >= budget_bytes):
                break
            j, i = self.locate(g)
            next_shard = int(self.starts[j + 1])
            try:
                sh = self.shard(j, keep=False)
                if field == "key":
                    for k in range(i, len(sh)):
                        if query in sh.keys[k]:
                            rows.append(self._index_row(sh, j, k))
                            if len(rows) >= max_results:
                                g = int(self.starts[j]) + k + 1
                                break
                    else:
                        g = next_shard
                    continue
                end = len(sh)
                for s in sh.iter(i, end):
                    nbytes += sh.lengths[s["__index__"]]
                    g = int(self.starts[j]) + s["__index__"] + 1
                    if _meta_match(s["meta"], field, query):
                        rows.append(_row(s, g - 1, self.entries[j].name))
                    if (
                        len(rows) >= max_results
                        or nbytes >= budget_bytes
                        or (time.perf_counter() - t0 > budget_s)
                    ):
                        break
                else:
                    g = next_shard
            except (FormatError, OSError) as e:
                rows.append({"g": g, "error": wio.scrub(str(e))})
                g = next_shard
        return SearchResult(rows=rows, start=start, stop=g, complete=g >= self.num_samples)

    def _index_row(self, sh: Shard, j: int, k: int) -> Dict[str, Any]:
        return {
            "g": int(self.starts[j]) + k,
            "key": sh.keys[k],
            "tokens": sh.num_tokens[k],
            "supervised": sh.num_supervised[k],
            "shard": self.entries[j].name,
        }

    def find_key(self, key: str, budget_s: float = 5.0) -> Optional[int]:
        """Global number of the sample with exactly this key, searching shard indexes within
        ``budget_s`` seconds (None when not found in that time)."""
        t0 = time.perf_counter()
        for j in range(len(self.entries)):
            if j and time.perf_counter() - t0 > budget_s:
                raise ViewError(
                    404,
                    f"key {key!r} not found in the first {j} of "
                    f"{len(self.entries)} shards of {self.name} (time budget)",
                )
            try:
                sh = self.shard(j, keep=False)
            except (FormatError, OSError):
                continue
            if key in sh.keys:
                return int(self.starts[j]) + sh.keys.index(key)
        return None


def _row(s: Dict[str, Any], g: int, shard_name: str) -> Dict[str, Any]:
    meta = s["meta"] if isinstance(s["meta"], dict) else {}
    ims = _meta_images(meta)
    n = int(s["input_ids"].size)
    return {
        "g": g,
        "key": s["__key__"],
        "tokens": n,
        "supervised": int(np.count_nonzero(s["labels"][:n] != IGNORE_INDEX)),
        "images": [grid_label(im) for im in ims],
        "id": meta.get("id"),
        "source": meta.get("source"),
        "shard": shard_name,
    }


def _meta_match(meta: Any, field: str, query: str) -> bool:
    if field == "meta":
        return query in json.dumps(meta, ensure_ascii=False)
    if not isinstance(meta, dict) or meta.get(field) is None:
        return False
    v = meta[field]
    return query in (v if isinstance(v, str) else json.dumps(v, ensure_ascii=False))


# --- opening sources --------------------------------------------------------------------------


def _default_name(url: str) -> str:
    stem = wio.redact(url).rstrip("/")
    if stem.endswith(".json") and stem.rsplit("/", 1)[-1] == "index.json":
        stem = stem.rsplit("/", 1)[0]
    return stem.rsplit("/", 1)[-1] or "dataset"


def open_dataset(
    url: str, opts: wio.IOOptions = wio.DEFAULT, name: Optional[str] = None, **kw: Any
) -> Dataset:
    """A manifest (``index.json`` or a folder holding one), a shard index or a shard."""
    if not wio.is_remote(url) and os.path.isdir(url):
        url = os.path.join(url, "index.json")
    name = name or _default_name(url)
    if url.endswith(".json") and not url.endswith(".idx.json"):
        doc = load_manifest(url, opts)
        entries = [
            ShardEntry(
                s["url"],
                s["index_url"],
                int(s.get("num_samples", 0)),
                int(s.get("num_tokens", 0)),
                int(s.get("num_supervised", 0)),
                int(s.get("bytes", 0)),
            )
            for s in doc["shards"]
        ]
        return Dataset(name, url, entries, doc, opts, **kw)
    shards = open_shards(url, opts)  # one shard or one shard index
    if len(shards) != 1:
        raise ValueError(f"{wio.redact(url)}: expected one shard, found {len(shards)}")
    sh = shards[0]
    idx = sh.index
    e = ShardEntry(
        sh.url, None, len(sh), int(sum(sh.num_tokens)), int(sum(sh.num_supervised)), int(idx.get("bytes", 0))
    )
    doc = {k: idx[k] for k in ("dtype", "vocab_size", "tokenizer") if k in idx}
    return Dataset(name, url, [e], doc, opts, first=sh, **kw)


@dataclass
class Source:
    """What ``wds-tools view`` serves: datasets, and the data config they came from (if any)."""

    path: str
    datasets: List[Dataset]
    config: Any = None  # wds_tools.config.DataConfig for a data config source


def open_source(path: str, opts: wio.IOOptions = wio.DEFAULT, **kw: Any) -> Source:
    """A data config YAML (local), or a manifest, shard index or shard (local or remote)."""
    if path.endswith((".yaml", ".yml")):
        from ..config import load_data_config

        if wio.is_remote(path):
            raise ValueError(f"{wio.redact(path)}: a data config must be a local file")
        cfg = load_data_config(path)
        datasets = [open_dataset(d.manifest, opts, name=d.name, **kw) for d in cfg.datasets]
        return Source(path, datasets, cfg)
    return Source(path, [open_dataset(path, opts, **kw)])


# --- mixture ----------------------------------------------------------------------------------


@dataclass
class MixReport:
    """``wds-tools mix`` reports at growing prefixes of one reader's stream."""

    samples: List[int]  # simulated samples at each point
    reports: List[Dict[str, Any]]  # mix_cli.dry_run output at each point
    batch_size: int

    @property
    def final(self) -> Dict[str, Any]:
        return self.reports[-1]


def mix_report(
    config: str,
    samples: int,
    batch_size: int,
    points: int = 24,
    dry_run: Optional[Callable[..., Dict[str, Any]]] = None,
) -> MixReport:
    """Realized shares over steps: ``wds-tools mix --samples N`` for ``points`` values of N up
    to ``samples`` (each point is exactly what that command prints)."""
    if dry_run is None:
        from ..mix_cli import dry_run as default_dry_run

        dry_run = default_dry_run
    ns = sorted({max(batch_size, int(round(samples * k / points))) for k in range(1, points + 1)})
    reports = []
    for n in ns:
        rep = dry_run(config, n, batch_size=batch_size)
        reports.append(rep)
        if rep["ended"]:
            break
    return MixReport([r["simulated_samples"] for r in reports], reports, batch_size)


def iter_tokens(ids: np.ndarray, labels: np.ndarray) -> Iterator[Tuple[int, int, bool]]:
    """Runs ``(start, end, trained)`` of positions with the same supervision."""
    trained = labels[: len(ids)] != IGNORE_INDEX
    if not len(ids):
        return
    edges = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    bounds = [0, *edges.tolist(), len(ids)]
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield a, b, bool(trained[a])
