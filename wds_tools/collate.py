"""Collation: samples (token ids + supervised spans) -> a few contiguous int64 arrays.

``pad_batch`` right-pads to the longest sample of the batch (after truncation to
``max_seq_len``): inputs with ``pad_id``, labels with -100, attention mask 0. ``pack_batch`` puts
several samples into each row and adds per-sample ``position_ids`` (restarting at 0) and
``segment_ids`` (1, 2, ... per sample of a row, 0 on padding); the first token of every sample
gets label -100, so no position is trained to predict across a document boundary.

Both write into one ``[k, B, T]`` array (``out=`` can supply the memory, e.g. a shared-memory
tensor's numpy view) so a batch crosses process boundaries as one buffer. Labels are built
straight from the spans into the batch; no per-sample label array is made.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .format import IGNORE_INDEX

__all__ = ["pad_batch", "pack_batch", "PAD_FIELDS", "PACK_FIELDS", "to_torch", "rows_for_packing"]

PAD_FIELDS = ("input_ids", "labels", "attention_mask")
PACK_FIELDS = ("input_ids", "labels", "attention_mask", "position_ids", "segment_ids")

Spans = Sequence[Sequence[int]]
Alloc = Callable[[Tuple[int, ...]], np.ndarray]


def _alloc(shape: Tuple[int, ...], alloc: Optional[Alloc]) -> np.ndarray:
    return alloc(shape) if alloc is not None else np.empty(shape, dtype=np.int64)


def pad_batch(ids: Sequence[np.ndarray], spans: Sequence[Spans], max_seq_len: int, pad_id: int = 0,
              alloc: Optional[Alloc] = None) -> Tuple[np.ndarray, Dict[str, int]]:
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


def pack_batch(ids: Sequence[np.ndarray], spans: Sequence[Spans], rows: Sequence[Sequence[int]],
               max_seq_len: int, pad_id: int = 0,
               alloc: Optional[Alloc] = None) -> Tuple[np.ndarray, Dict[str, int]]:
    """``[5, B, T]`` int64 (input_ids, labels, attention_mask, position_ids, segment_ids) with the
    samples ``rows[r]`` (indexes into ``ids``) laid end to end in row ``r``; ``T`` is the longest
    row. Counts as in ``pad_batch``."""
    lens = [min(len(x), max_seq_len) for x in ids]
    used = [sum(lens[i] for i in r) for r in rows]
    b, t = len(rows), max(used)
    out = _alloc((5, b, t), alloc)
    inp, lab, att, pos, seg = (out[k] for k in range(5))
    inp.fill(pad_id)
    lab.fill(IGNORE_INDEX)
    att.fill(0)
    pos.fill(0)
    seg.fill(0)
    truncated = 0
    ar = np.arange(t)
    for r, members in enumerate(rows):
        off = 0
        for k, i in enumerate(members):
            n = lens[i]
            x = ids[i][:n]
            truncated += len(ids[i]) - n
            inp[r, off:off + n] = x
            att[r, off:off + n] = 1
            pos[r, off:off + n] = ar[:n]
            seg[r, off:off + n] = k + 1
            row = lab[r, off:off + n]
            for s, e in spans[i]:
                if s >= n:
                    break
                row[s:e] = x[s:e]
            row[0] = IGNORE_INDEX  # never predict a sample's first token from the previous one
            off += n
    real = sum(used)
    return out, {"tokens": real, "padding": b * t - real, "truncated": truncated}


def to_torch(arr: np.ndarray, fields: Sequence[str]) -> Dict[str, "object"]:
    """Name the planes of a ``[k, B, T]`` array as torch tensors sharing its memory."""
    import torch

    t = torch.from_numpy(arr) if isinstance(arr, np.ndarray) else arr
    return {f: t[k] for k, f in enumerate(fields)}
