"""Collation: samples (token ids + supervised spans) -> a few contiguous int64 arrays.

``pad_batch`` right-pads to the longest sample of the batch (after truncation to
``max_seq_len``): inputs with ``pad_id``, labels with -100, attention mask 0. ``pack_batch`` puts
several samples into each row and adds per-sample ``position_ids`` (restarting at 0) and
``segment_ids`` (1, 2, ... per sample of a row, 0 on padding); the first token of every sample
gets label -100, so no position is trained to predict across a document boundary.

Both write into one ``[k, B, T]`` array (``alloc`` can supply the memory). Labels are built
straight from the spans into the batch; no per-sample label array is made.

Across processes a batch travels compact: ``pad_compact``/``pack_compact`` write the ids in a
small unsigned dtype, a one-byte "not a target" mask and the row lengths (or, packed, segment and
position ids in 16 or 32 bits): 3 bytes per token instead of 24 for uint16 ids, padded. The
receiving process expands them (``expand``) into exactly what ``pad_batch``/``pack_batch`` return.
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .format import IGNORE_INDEX

__all__ = [
    "pad_batch",
    "pack_batch",
    "PAD_FIELDS",
    "PACK_FIELDS",
    "rows_for_packing",
    "pad_compact",
    "pack_compact",
    "compact_layout",
    "expand",
]

PAD_FIELDS = ("input_ids", "labels", "attention_mask")
PACK_FIELDS = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids")

Spans = Sequence[Sequence[int]]
Alloc = Callable[[Tuple[int, ...]], np.ndarray]


def _alloc(shape: Tuple[int, ...], alloc: Optional[Alloc]) -> np.ndarray:
    return alloc(shape) if alloc is not None else np.empty(shape, dtype=np.int64)


def pad_batch(
    ids: Sequence[np.ndarray],
    spans: Sequence[Spans],
    max_seq_len: int,
    pad_id: int = 0,
    alloc: Optional[Alloc] = None,
) -> Tuple[np.ndarray, Dict[str, int]]:
    """``[3, B, T]`` int64 (input_ids, labels, attention_mask) and counts
    ``{"tokens", "padding", "truncated"}`` (real tokens, pad positions, tokens cut off)."""
    lens = [min(len(x), max_seq_len) for x in ids]
    b, t = len(lens), max(lens)
    out = _alloc((3, b, t), alloc)
    inp, lab, att = out[0], out[1], out[2]
    truncated = 0
    # Row by row, each position written once (cheaper than filling whole planes first).
    for i in range(b):
        x, n = ids[i], lens[i]
        if n < len(x):
            truncated += len(x) - n
            x = x[:n]
        row = inp[i]
        row[:n] = x
        if n < t:
            row[n:] = pad_id
        row, prev = lab[i], 0
        for s, e in spans[i]:
            if s >= n:
                break
            if e > n:
                e = n
            if s > prev:
                row[prev:s] = IGNORE_INDEX
            row[s:e] = x[s:e]
            prev = e
        if prev < t:
            row[prev:] = IGNORE_INDEX
        row = att[i]
        row[:n] = 1
        if n < t:
            row[n:] = 0
    real = sum(lens)
    return out, {"tokens": real, "padding": b * t - real, "truncated": truncated}


def rows_for_packing(lengths: Sequence[int], max_seq_len: int, num_rows: int) -> List[List[int]]:
    """Greedy first-fit-in-order: consecutive samples fill a row until the next does not fit
    (lengths already truncated to ``max_seq_len``); stops when ``num_rows`` rows are full."""
    rows: List[List[int]] = [[]]
    used = 0
    for i, n in enumerate(lengths):
        if used + n > max_seq_len:
            if len(rows) == num_rows:
                break
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def pack_batch(
    ids: Sequence[np.ndarray],
    spans: Sequence[Spans],
    rows: Sequence[Sequence[int]],
    max_seq_len: int,
    pad_id: int = 0,
    alloc: Optional[Alloc] = None,
) -> Tuple[np.ndarray, Dict[str, int]]:
    """``[5, B, T]`` int64 (input_ids, labels, attention_mask, position_ids, segment_ids) with the
    samples ``rows[r]`` (indexes into ``ids``) laid end to end in row ``r``; ``T`` is the longest
    row. Counts as in ``pad_batch``. (The compact packed batch, expanded: one packing layout.)"""
    lens = [min(len(x), max_seq_len) for x in ids]
    used = [sum(lens[i] for i in r) for r in rows]
    b, t = len(rows), max(used)
    arrays = {
        name: np.empty(shape, dt)
        for name, shape, dt in compact_layout(ids, (len(PACK_FIELDS), b, t), pack=True)
    }
    pack_compact(ids, spans, rows, max_seq_len, arrays)
    out = expand(arrays, pad_id, _alloc((len(PACK_FIELDS), b, t), alloc))
    real = sum(used)
    truncated = sum(len(ids[i]) - lens[i] for r in rows for i in r)
    return out, {"tokens": real, "padding": b * t - real, "truncated": truncated}


# --- compact batches: a few bytes per token across processes ----------------------------------


def compact_layout(
    ids: Sequence[np.ndarray], shape: Tuple[int, int, int], pack: bool
) -> List[Tuple[str, Tuple[int, ...], np.dtype]]:
    """``(name, shape, dtype)`` of the arrays of a compact batch of final shape ``[k, B, T]``."""
    _, b, t = shape
    dt = np.result_type(*[x.dtype for x in ids]) if ids else np.dtype(np.uint8)
    if dt.kind not in "ui":
        dt = np.dtype(np.int64)
    out: List[Tuple[str, Tuple[int, ...], np.dtype]] = [
        ("ids", (b, t), dt),
        ("ignore", (b, t), np.dtype(np.uint8)),
    ]
    if pack:
        small = np.dtype(np.uint16 if t <= np.iinfo(np.uint16).max else np.int32)
        return out + [("pos", (b, t), small), ("seg", (b, t), small)]
    return out + [("lens", (b,), np.dtype(np.int64))]


def pad_compact(
    ids: Sequence[np.ndarray], spans: Sequence[Spans], max_seq_len: int, arrays: Dict[str, np.ndarray]
) -> None:
    """Fill the compact arrays (``compact_layout(..., pack=False)``) of a padded batch: ids (0 on
    padding), ``ignore`` (1 where the label is -100) and the row lengths."""
    x_all, ign, lens = arrays["ids"], arrays["ignore"], arrays["lens"]
    t = x_all.shape[1]
    ign.fill(1)
    for i, x in enumerate(ids):
        n = len(x) if len(x) < max_seq_len else max_seq_len
        lens[i] = n
        row = x_all[i]
        row[:n] = x[:n]
        if n < t:
            row[n:] = 0
        row = ign[i]
        for s, e in spans[i]:
            if s >= n:
                break
            row[s : e if e < n else n] = 0


def pack_compact(
    ids: Sequence[np.ndarray],
    spans: Sequence[Spans],
    rows: Sequence[Sequence[int]],
    max_seq_len: int,
    arrays: Dict[str, np.ndarray],
) -> None:
    """Fill the compact arrays (``compact_layout(..., pack=True)``) of a packed batch: ids,
    ``ignore`` (1 where the label is -100: unsupervised, first token of a sample, padding),
    position ids and segment ids (0 on padding)."""
    x_all, ign, pos, seg = arrays["ids"], arrays["ignore"], arrays["pos"], arrays["seg"]
    x_all.fill(0)
    ign.fill(1)
    pos.fill(0)
    seg.fill(0)
    ar = np.arange(x_all.shape[1], dtype=pos.dtype)
    for r, members in enumerate(rows):
        off = 0
        for k, i in enumerate(members):
            x = ids[i]
            n = len(x) if len(x) < max_seq_len else max_seq_len
            x_all[r, off : off + n] = x[:n]
            pos[r, off : off + n] = ar[:n]
            seg[r, off : off + n] = k + 1
            row = ign[r, off : off + n]
            for s, e in spans[i]:
                if s >= n:
                    break
                row[s:e] = 0
            row[0] = 1  # never predict a sample's first token from the previous one
            off += n


def expand(arrays: Dict[str, np.ndarray], pad_id: int, out: Optional[np.ndarray] = None) -> np.ndarray:
    """The ``[k, B, T]`` int64 batch (``pad_batch``/``pack_batch``'s) of a compact one, written
    into ``out`` when given. A few vectorized passes; no Python loop over samples."""
    x, ign = arrays["ids"], arrays["ignore"].view(bool)
    b, t = x.shape
    packed = "seg" in arrays
    if out is None:
        out = np.empty((5 if packed else 3, b, t), np.int64)
    inp, lab, att = out[0], out[1], out[2]
    inp[...] = x
    if packed:
        out[3] = arrays["pos"]
        out[4] = arrays["seg"]
        np.not_equal(out[4], 0, out=att)
        if pad_id:
            np.copyto(inp, pad_id, where=arrays["seg"] == 0)
    else:
        valid = np.arange(t) < arrays["lens"][:, None]
        att[...] = valid
        if pad_id:
            np.copyto(inp, pad_id, where=~valid)
    lab[...] = inp
    np.copyto(lab, IGNORE_INDEX, where=ign)
    return out
