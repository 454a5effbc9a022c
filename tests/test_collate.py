"""Collation: right padding, truncation, labels from spans, packing with boundaries."""

from __future__ import annotations

import numpy as np

from wds_tools.collate import pack_batch, pad_batch, rows_for_packing


def test_pad_batch_right_pads_truncates_and_builds_labels_from_spans():
    ids = [np.array([5, 6, 7, 8, 9], np.uint16), np.array([1, 2], np.uint16)]
    spans = [[[1, 3], [4, 5]], [[0, 2]]]
    arr, counts = pad_batch(ids, spans, max_seq_len=4, pad_id=0)
    inp, lab, att = arr
    assert arr.dtype == np.int64 and arr.shape == (3, 2, 4)
    assert inp.tolist() == [[5, 6, 7, 8], [1, 2, 0, 0]]
    assert lab.tolist() == [[-100, 6, 7, -100], [1, 2, -100, -100]]  # span [4,5) truncated away
    assert att.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert counts == {"tokens": 6, "padding": 2, "truncated": 1}


def test_pad_batch_honours_pad_id_and_unsupervised_samples():
    arr, _ = pad_batch([np.array([3], np.uint8), np.array([4, 4, 4], np.uint8)], [[], []], 10, pad_id=7)
    assert arr[0].tolist() == [[3, 7, 7], [4, 4, 4]]
    assert (arr[1] == -100).all()


def test_rows_for_packing_is_greedy_in_order():
    assert rows_for_packing([3, 3, 5, 1, 8], 8, 3) == [[0, 1], [2, 3], [4]]
    assert rows_for_packing([3, 3, 5, 1, 8], 8, 2) == [[0, 1], [2, 3]]


def test_pack_batch_position_ids_segments_and_no_cross_document_labels():
    ids = [
        np.array([10, 11, 12], np.uint16),
        np.array([20, 21], np.uint16),
        np.array([30, 31, 32, 33, 34, 35], np.uint16),
    ]
    spans = [[[0, 3]], [[0, 2]], [[2, 6]]]
    arr, counts = pack_batch(ids, spans, [[0, 1], [2]], max_seq_len=5)
    inp, lab, att, pos, seg = arr
    assert inp.tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 34]]
    assert pos.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 4]]
    assert seg.tolist() == [[1, 1, 1, 2, 2], [1, 1, 1, 1, 1]]
    assert att.tolist() == [[1] * 5, [1] * 5]
    # the first token of every document is never a target (it would be predicted across the
    # boundary from the previous document)
    assert lab.tolist() == [[-100, 11, 12, -100, 21], [-100, -100, 32, 33, 34]]
    assert counts == {"tokens": 10, "padding": 0, "truncated": 1}


def test_compact_batches_expand_to_exactly_pad_and_pack_batch():
    from wds_tools.collate import compact_layout, expand, pack_compact, pad_compact

    rng = np.random.default_rng(0)
    for trial in range(200):
        b, limit = int(rng.integers(1, 6)), int(rng.integers(1, 40))
        dt = [np.uint8, np.uint16, np.uint32][trial % 3]
        ids = [rng.integers(0, 250, int(rng.integers(1, 50))).astype(dt) for _ in range(b)]
        if trial % 5 == 0:
            ids[0] = ids[0].astype(np.uint32)  # mixed dtypes in one batch
        spans = []
        for x in ids:
            pts = sorted(set(rng.integers(0, len(x) + 1, 4).tolist()))
            spans.append([[s, e] for s, e in zip(pts[::2], pts[1::2]) if s < e])
        pad_id = [0, 7, -1][trial % 3]
        ref, _ = pad_batch(ids, spans, limit, pad_id)
        arrays = {n: np.full(s, 99).astype(d) for n, s, d in compact_layout(ids, ref.shape, False)}
        pad_compact(ids, spans, limit, arrays)
        if ref[0].size >= 64:
            assert sum(a.nbytes for a in arrays.values()) < ref.nbytes // 3
        np.testing.assert_array_equal(expand(arrays, pad_id), ref)
        rows = rows_for_packing([min(len(x), limit) for x in ids], limit, b)
        k = sum(len(r) for r in rows)
        ref, _ = pack_batch(ids[:k], spans[:k], rows, limit, pad_id)
        arrays = {n: np.full(s, 99).astype(d) for n, s, d in compact_layout(ids[:k], ref.shape, True)}
        pack_compact(ids[:k], spans[:k], rows, limit, arrays)
        got = expand(arrays, pad_id)
        assert got.dtype == np.int64 and got.shape == ref.shape
        np.testing.assert_array_equal(got, ref)
