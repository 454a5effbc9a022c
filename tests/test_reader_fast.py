"""The reader's fast paths (vectorized JSON members, word-wise header checks, block labels,
index checks at C speed) give exactly what the exact per-sample path gives, errors included."""

from __future__ import annotations

import json

import numpy as np
import pytest

from wds_tools.contract import check_index, index_columns
from wds_tools.format import (
    FormatError,
    decode_block,
    decode_block_parts,
    decode_ids_spans,
    spans_to_labels,
)
from wds_tools.merge import merge
from wds_tools.reader import iter_samples, open_shards
from wds_tools.writer import ShardWriter


@pytest.fixture(autouse=True, params=["scatter", "slices"])
def label_marking(request, monkeypatch):
    """Every test here runs with both ways of writing -100 over unsupervised runs: one scatter
    of every position (short runs) and one slice per run (long runs; the reader picks by the
    block's mean run length)."""
    import wds_tools.reader as reader

    monkeypatch.setattr(reader, "_RUN_SLICE", 10**9 if request.param == "scatter" else 1)
    return request.param


def _write(root, samples, vocab=65536, max_samples=1000):
    """samples: (key, ids, mask or None, meta or None)."""
    with ShardWriter(str(root), vocab_size=vocab, max_samples=max_samples) as w:
        for key, ids, mask, meta in samples:
            w.write(key, ids, mask=mask, meta=meta)
    merge(str(root))
    return str(root / "index.json")


def _one_span(n, rng, meta=None, key_prefix="s"):
    out = []
    for i in range(n):
        ids = rng.integers(0, 65536, int(rng.integers(2, 400)))
        mask = np.zeros(ids.size, bool)
        mask[int(rng.integers(0, ids.size)) :] = True  # one span [p, n)
        out.append((f"{key_prefix}{i:06d}", ids, mask, meta(i) if meta else None))
    return out


def _agree(sh, buf):
    """decode_block (both outputs) agrees with decode_ids_spans sample by sample."""
    buf = bytes(buf)
    got = decode_block(buf, sh.offsets, sh.lengths, sh.keys, sh.num_tokens, sh.dtype, "w")
    parts = decode_block_parts(buf, sh.offsets, sh.lengths, sh.keys, sh.num_tokens, sh.dtype, "w")
    assert [x is None for x in got[0]] == [x is None for x in parts[0]]
    ids, spans, metas, errors = got
    for i in range(len(sh)):
        try:
            want = decode_ids_spans(
                buf, sh.offsets[i], sh.lengths[i], sh.keys[i], sh.num_tokens[i], sh.dtype, "w"
            )
        except FormatError as e:
            assert i in errors and str(errors[i]) == str(e) and ids[i] is None
            continue
        assert i not in errors
        np.testing.assert_array_equal(ids[i], want[0])
        assert spans[i] == want[1] and metas[i] == want[2]
        first, s1, e1 = parts[5], parts[6], parts[7]
        if first[i] >= 0:  # the typed position of its ids
            np.testing.assert_array_equal(parts[4][first[i] : first[i] + len(want[0])], want[0])
        if s1[i] >= 0:  # read by the vectorized parse: exactly the one span
            assert want[1] == [[int(s1[i]), int(e1[i])]]
    return errors


@pytest.mark.parametrize(
    "meta", [None, lambda i: {"i": i, "text": "é 日本"}, lambda i: {"a": {"b": [i, None, "]],"]}}]
)
def test_one_span_members_agree_with_the_exact_path(tmp_path, meta):
    samples = _one_span(60, np.random.default_rng(1), meta)
    man = _write(tmp_path, samples)
    sh = open_shards(man)[0]
    assert _agree(sh, open(sh.url, "rb").read()) == {}
    for s, (key, ids, mask, m) in zip(iter_samples(man), samples):
        assert s["__key__"] == key and s["meta"] == (m if m is not None else {})
        np.testing.assert_array_equal(s["labels"], np.where(mask, ids, -100))
        assert s["labels"].dtype == np.int64 and s["num_supervised"] == int(mask.sum())


def test_mixed_blocks_give_exact_labels(tmp_path):
    """One-span, many-span, unsupervised and fully supervised samples, with and without meta,
    in one block: labels and num_supervised as the spans say."""
    rng = np.random.default_rng(2)
    samples = []
    for i in range(80):
        ids = rng.integers(0, 65536, int(rng.integers(1, 300)))
        kind = i % 4
        if kind == 0:
            mask = rng.random(ids.size) < 0.5  # many spans
        elif kind == 1:
            mask = np.zeros(ids.size, bool)  # nothing supervised
        elif kind == 2:
            mask = np.ones(ids.size, bool)  # one span, the whole sample
        else:
            mask = np.zeros(ids.size, bool)
            mask[: max(1, ids.size // 2)] = True  # one span at the start
        samples.append((f"m{i:04d}", ids, mask, {"k": i} if i % 3 == 0 else None))
    man = _write(tmp_path, samples, max_samples=40)
    for sh in open_shards(man):
        assert _agree(sh, open(sh.url, "rb").read()) == {}
    got = list(iter_samples(man))
    assert len(got) == len(samples)
    for s, (_, ids, mask, _) in zip(got, samples):
        np.testing.assert_array_equal(s["labels"], np.where(mask, ids, -100))
        assert s["num_supervised"] == int(mask.sum())


def _json_at(sh, buf, i):
    """Start and size of sample i's JSON member in buf."""
    j = sh.offsets[i] + sh.lengths[i] - 512 * 2  # one-block JSON member: header, then data
    size = int(bytes(buf[j + 124 : j + 135]), 8)
    return j + 512, size


@pytest.mark.parametrize(
    "member",
    [
        b'{"supervised":[[01,5]],"meta":{}}',  # leading zero: not JSON
        b'{"supervised":[[1,05]],"meta":{}}',
        b'{"supervised":[[1, 5]],"meta":{}}',  # whitespace: JSON, the scanner's
        b'{"supervised":[[5,1]],"meta":{}}',  # empty span
        b'{"supervised":[[1,999999]],"meta":{}}',  # past the sample
        b'{"supervised":[[1,5]],"meta":{},"supervised":[[1,2]]}',  # duplicate key: last wins
        b'{"supervised":[[1,5]],"meta":{"a":1}}  ',  # trailing whitespace: JSON
        b'{"supervised":[[1,5]],"meta":{"a":1}',  # cut short
        b'{"supervised":[[1,5]],"meta":nul}',
        b'{"supervised":[[1,2,3]],"meta":{}}',
        b'{"supervised":[[1111111111111,2]],"meta":{}}',  # 13 digits: past the fast parse
        b'{"supervised":[[0000000000000000000000000,1]]}',  # a comma past the window
        b'{"supervised":[[-1,5]],"meta":{}}',
        b'{"supervised":[[1e0,5]],"meta":{}}',
        b'{"supervised":[[1,5]],"meta":{}}\x00',
        b'{"supervised":[[1,5]]}',  # no meta: {}
        b'{"supervised":[[1,5]],"meta":"\xff"}',  # not UTF-8
    ],
)
def test_odd_json_members_match_the_exact_path(tmp_path, member):
    samples = _one_span(12, np.random.default_rng(3))
    samples = [
        (k, ids[:50] if ids.size >= 50 else np.resize(ids, 50), np.ones(50, bool), m)
        for k, ids, _, m in samples
    ]
    man = _write(tmp_path, samples)
    sh = open_shards(man)[0]
    buf = bytearray(open(sh.url, "rb").read())
    start, size = _json_at(sh, buf, 5)
    assert size <= 512 and len(member) <= 512
    buf[start : start + 512] = member + b"\0" * (512 - len(member))
    j = start - 512
    hdr = bytearray(buf[j : j + 512])
    hdr[124:135] = f"{len(member):011o}".encode()
    hdr[148:156] = b" " * 8
    hdr[148:156] = f"{sum(hdr):06o}\0 ".encode()
    buf[j : j + 512] = hdr
    errors = _agree(sh, buf)
    assert set(errors) <= {5}


def test_header_corruptions_match_the_exact_path(tmp_path):
    samples = _one_span(20, np.random.default_rng(4))
    man = _write(tmp_path, samples)
    sh = open_shards(man)[0]
    buf = bytearray(open(sh.url, "rb").read())
    o = sh.offsets
    buf[o[1] + 2] ^= 1  # key of the ids member
    buf[o[2] + 261] = ord("X")  # last byte of "ustar"
    buf[o[3] + 512 + 5] = 0  # last byte of the npy magic
    buf[o[4] + 512 + 10 + 13] = ord("4")  # dtype '<u4' where the index says uint16
    j = o[6] + 512 + ((10 + buf[o[6] + 520] + sh.num_tokens[6] * 2 + 511) // 512) * 512
    buf[j + 3] ^= 1  # key of the JSON member
    buf[j + 125] = ord("9")  # not an octal digit
    errors = _agree(sh, buf)
    assert {1, 2, 3, 4, 6} <= set(errors) and 0 not in errors and 7 not in errors
    # offsets off the 512-byte grid go to the exact path too (and fail there)
    off = list(sh.offsets)
    off[8] += 8
    got = decode_block(bytes(buf), off, sh.lengths, sh.keys, sh.num_tokens, sh.dtype, "w")
    assert 8 in got[3] and "no tar header" in str(got[3][8])


def test_tiny_buffers_are_errors_not_crashes():
    for buf in (b"", b"abc", bytes(7)):
        ids, _, _, errors = decode_block(buf, [0], [2048], ["k"], [3], np.uint16, "w")
        assert ids == [None] and "truncated" in str(errors[0])


def test_held_labels_survive_buffer_reuse_and_writes(tmp_path):
    """Labels are views of shared chunk buffers: one held across the whole read keeps its
    values, and writing into one sample's labels never changes another's."""
    samples = _one_span(400, np.random.default_rng(5))
    man = _write(tmp_path, samples, max_samples=150)
    held = []
    for n, s in enumerate(iter_samples(man)):
        if n % 97 == 0:
            held.append((n, s["labels"]))
        s["labels"][:] = 7  # a consumer writing into its labels
    for n, lab in held:
        _, ids, mask, _ = samples[n]
        assert (lab == 7).all()  # its own write, nobody else's
    for s, (_, ids, mask, _) in zip(iter_samples(man), samples):
        np.testing.assert_array_equal(s["labels"], spans_to_labels(ids, [[int(np.argmax(mask)), ids.size]]))


def _index(keys, **cols):
    n = len(keys)
    base = {
        "key": keys,
        "offset": [0] * n,
        "length": [1024] * n,
        "num_tokens": [1] * n,
        "num_supervised": [0] * n,
    }
    base.update(cols)
    return {"dtype": "uint16", "num_samples": n, "samples": base}


@pytest.mark.parametrize(
    "keys,cols,message",
    [
        (["a", "b\nc"], {}, "index key 'b\\nc' is not a valid sample key"),
        (["a", "b.c"], {}, "index key 'b.c'"),
        (["a", 3], {}, "index key 3"),
        (["a", "b"], {"offset": [0, True]}, "samples.offset holds True"),
        (["a", "b"], {"length": [1024, 1.0]}, "samples.length holds 1.0"),
        (["a", "b"], {"num_tokens": [1, -1]}, "samples.num_tokens holds -1"),
        (["a", "b"], {"num_supervised": [0, None]}, "samples.num_supervised holds None"),
    ],
)
def test_index_check_names_the_first_bad_value(keys, cols, message):
    with pytest.raises(FormatError, match="^w: ") as e:
        check_index(_index(keys, **cols), "w")
    assert message in str(e.value) and "\n" not in str(e.value).replace("\\n", "")


def test_index_columns_are_the_checked_arrays():
    cols = index_columns(_index(["a", "b"], offset=[0, 2048], length=[2048, 1024]), "w")
    assert cols["offset"].dtype == np.int64 and cols["offset"].tolist() == [0, 2048]
    assert cols["length"].tolist() == [2048, 1024] and cols["num_supervised"].tolist() == [0, 0]
    big = index_columns(_index(["a"], offset=[2**70]), "w")  # valid JSON count, no int64 array
    assert "offset" not in big and "length" in big
    assert index_columns(_index([]), "w")["offset"].size == 0


def test_truncated_shard_without_bytes_in_its_index_is_a_format_error(tmp_path):
    samples = _one_span(30, np.random.default_rng(6))
    man = _write(tmp_path, samples)
    sh = open_shards(man)[0]
    idx_path = sh.url[: -len(".tar")] + ".idx.json"
    doc = json.load(open(idx_path))
    del doc["bytes"]
    json.dump(doc, open(idx_path, "w"))
    with open(sh.url, "r+b") as f:
        f.truncate(sh.offsets[20] + 700)
    with pytest.raises(FormatError, match="truncated shard: ends inside sample"):
        list(iter_samples(man))


def test_index_listing_samples_out_of_shard_order_reads_exactly(tmp_path):
    """An index may list a shard's samples in another order than their bytes (first and last
    in place): every sample still comes out, in index order, with its own labels, also when
    the label chunks of a piece would cross the reordered samples."""
    rng = np.random.default_rng(7)
    samples = []
    for i in range(6):
        ids = rng.integers(0, 65536, 30_000 + i)
        mask = np.zeros(ids.size, bool)
        mask[100 * (i + 1) :] = True
        samples.append((f"big{i}", ids, mask, None))
    man = _write(tmp_path, samples)
    sh = open_shards(man)[0]
    idx_path = sh.url[: -len(".tar")] + ".idx.json"
    doc = json.load(open(idx_path))
    order = [0, 3, 2, 1, 4, 5]
    doc["samples"] = {k: [v[i] for i in order] for k, v in doc["samples"].items()}
    json.dump(doc, open(idx_path, "w"))
    got = list(iter_samples(man))
    assert [s["__key__"] for s in got] == [samples[i][0] for i in order]
    for s, i in zip(got, order):
        _, ids, mask, _ = samples[i]
        np.testing.assert_array_equal(s["input_ids"], ids)
        np.testing.assert_array_equal(s["labels"], np.where(mask, ids, -100))
