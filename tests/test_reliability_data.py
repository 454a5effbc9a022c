"""Reliability, data faults: truncated tars, flipped bytes, index/tar disagreement, missing
shards, token ids outside the vocabulary. Each is detected, reported with the shard and the
sample, and handled by the policy (``on_error: fail|skip``, ``wds-tools verify``, ``merge``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from wds_tools.config import parse_data_config
from wds_tools.format import FormatError
from wds_tools.loader import iter_mixed as loader_samples
from wds_tools.merge import MergeError, merge
from wds_tools.reader import ReadStats, Shard, iter_samples
from wds_tools.verify import verify
from wds_tools.writer import ShardWriter

from reliability_log import record

pytestmark = pytest.mark.reliability

VOCAB = 1000  # uint16 holds ids up to 65,535: out-of-vocabulary ids can be stored


def _write(root, n=24, per_shard=8, seed=0):
    rng = np.random.default_rng(seed)
    samples = {}
    with ShardWriter(str(root), vocab_size=VOCAB, max_samples=per_shard) as w:
        for i in range(n):
            ids = rng.integers(0, VOCAB, int(rng.integers(5, 90))).astype(np.uint16)
            labels = np.where(rng.random(ids.size) < 0.5, ids.astype(np.int64), -100)
            key = f"s-{i:04d}"
            meta = {"index": i, "text": f"caption {i}"}
            w.write(key, ids, labels=labels, meta=meta)
            samples[key] = (ids.tolist(), labels.tolist(), meta)
    merge(str(root))
    return samples


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("clean_ds")
    return str(root), _write(root)


def _copy(clean, tmp_path, name="ds"):
    dst = str(tmp_path / name)
    shutil.copytree(clean[0], dst)
    return dst


def _tars(root):
    return sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".tar"))


def _read_all(root, on_error, verify_checksums=False):
    """(samples, stats, error) of a reader pass."""
    stats, got = ReadStats(), []
    try:
        for s in iter_samples(
            os.path.join(root, "index.json"),
            on_error=on_error,
            stats=stats,
            verify_checksums=verify_checksums,
        ):
            got.append((s["__key__"], s["input_ids"].tolist(), s["labels"].tolist(), s["meta"]))
    except (FormatError, OSError) as e:
        return got, stats, e
    return got, stats, None


def _differs(got, samples):
    """Yielded samples that differ from the originals (silent corruption)."""
    return [k for k, ids, labels, meta in got if k not in samples or (ids, labels, meta) != samples[k]]


def _loader_cfg(root, on_error):
    return parse_data_config(
        {
            "on_error": on_error,
            "shuffle": False,
            "datasets": [{"name": "d", "manifest": os.path.join(root, "index.json"), "max_epochs": 1}],
        }
    )


def _loader_read(root, on_error):
    got, err = [], None
    try:
        for s in loader_samples(_loader_cfg(root, on_error)):
            got.append((s["__key__"], s["input_ids"].tolist()))
    except (FormatError, OSError) as e:
        err = e
    return got, err


def _one_line(e):
    return "\n" not in str(e)


# ---------------------------------------------------------------------------------------------


def test_truncated_tar_every_cut(clean, tmp_path):
    """A shard cut at many points: fail raises naming the shard and the sample; skip yields
    only whole, unchanged samples; verify and merge report it; the loader never yields a
    partial sample."""
    root0, samples = clean
    tar0 = _tars(root0)[1]
    size = os.path.getsize(tar0)
    rng = np.random.default_rng(1)
    cuts = sorted(set(rng.integers(1, size, 12).tolist()) | {512, size - 1024, size - 1})
    detected = lost_wrong = 0
    for cut in cuts:
        root = _copy(clean, tmp_path, f"cut{cut}")
        tar = _tars(root)[1]
        with open(tar, "r+b") as f:
            f.truncate(cut)
        got, stats, err = _read_all(root, "fail")
        assert _differs(got, samples) == []
        if err is not None:
            assert os.path.basename(tar) in str(err) and _one_line(err)
            detected += 1
        else:  # cut inside the end-of-archive blocks: every sample is whole
            assert cut >= size - 1024 and len(got) == len(samples)
        got, stats, err = _read_all(root, "skip")
        assert err is None and _differs(got, samples) == []
        assert verify(os.path.join(root, "index.json"))["ok"] is False
        with pytest.raises(MergeError, match="bytes, its index says"):
            merge(root, save_path=os.path.join(root, "again.json"))
        lgot, lerr = _loader_read(root, "skip")
        assert lerr is None and all(ids == samples[k][0] for k, ids in lgot)
        lost_wrong += len(_differs(got, samples))
    if cuts:
        lgot, lerr = _loader_read(root, "fail")
    record(
        "data",
        "truncated tar",
        injected=len(cuts),
        tried=len(cuts),
        detected=detected,
        lost=lost_wrong,
        note=f"cuts of a {size}-byte shard; verify and merge flag every cut",
    )


def test_flipped_bytes_fast_path_vs_checksum(clean, tmp_path):
    """Flip one byte at many random positions of a shard. verify (sha256) detects every flip;
    with ``verify_checksums=True`` no changed sample is ever yielded. The fast read path
    (structure checks only) misses flips inside token ids (unless out of vocabulary) and
    inside JSON values: counted here, and only those regions may slip through."""
    root0, samples = clean
    tar0 = _tars(root0)[0]
    data0 = open(tar0, "rb").read()
    sh = Shard.open(tar0)
    # byte ranges of token ids and JSON payloads: where a flip can change a sample silently
    content = np.zeros(len(data0), bool)
    for i in range(len(sh)):
        off = sh.offsets[i]
        p = off + 512
        hlen = data0[p + 8] | (data0[p + 9] << 8)
        start = p + 10 + hlen
        content[start : start + sh.num_tokens[i] * 2] = True
        j = p + (10 + hlen + sh.num_tokens[i] * 2 + 511) // 512 * 512
        jsize = int(data0[j + 124 : j + 135], 8)
        content[j + 512 : j + 512 + jsize] = True
    rng = np.random.default_rng(7)
    positions = rng.choice(len(data0) - 1024, 400, replace=False).tolist()  # not the EOA zeros
    root = _copy(clean, tmp_path)
    tar = _tars(root)[0]
    manifest = os.path.join(root, "index.json")
    counts = {"verify": 0, "fast_detected": 0, "silent": 0, "harmless": 0, "checked_ok": 0, "loader": 0}
    for pos in positions:
        buf = bytearray(data0)
        buf[pos] ^= 1 << int(rng.integers(0, 8))
        with open(tar, "wb") as f:
            f.write(buf)
        rep = verify(manifest)
        assert not rep["ok"] and any("sha256" in p for p in rep["problems"])
        counts["verify"] += 1
        got, stats, err = _read_all(root, "skip")
        bad = _differs(got, samples)
        if stats.skipped_shards:
            counts["fast_detected"] += 1
            assert os.path.basename(tar) in stats.skipped_shards[0][0]
        if bad:
            counts["silent"] += 1
            assert content[pos], f"flip at byte {pos} outside ids/JSON changed {bad}"
        elif not stats.skipped_shards:
            counts["harmless"] += 1
        if len(positions) and pos in positions[::4]:  # the loader's decode path too
            lgot, lerr = _loader_read(root, "skip")
            assert lerr is None
            lbad = [k for k, ids in lgot if ids != samples[k][0]]
            assert not lbad or content[pos], (pos, lbad)
            counts["loader"] += 1
        got, stats, err = _read_all(root, "skip", verify_checksums=True)
        assert _differs(got, samples) == [] and len(stats.skipped_shards) == 1
        assert "sha256" in stats.skipped_shards[0][1]
        got, stats, err = _read_all(root, "fail", verify_checksums=True)
        assert isinstance(err, FormatError) and os.path.basename(tar) in str(err)
        counts["checked_ok"] += 1
    with open(tar, "wb") as f:
        f.write(data0)
    assert verify(manifest)["ok"]
    record(
        "data",
        "flipped byte",
        injected=len(positions),
        tried=len(positions),
        detected=counts["verify"],
        lost=0,
        note=(
            f"verify (sha256) {counts['verify']}/{len(positions)}; fast read path "
            f"{counts['fast_detected']} detected, {counts['silent']} silently changed "
            f"(all inside token ids/JSON), {counts['harmless']} harmless; with "
            f"verify_checksums 0 changed samples yielded; loader run on "
            f"{counts['loader']} of them"
        ),
    )


def _edit_index(root, shard_no, fn):
    p = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".idx.json"))[shard_no]
    doc = json.load(open(p))
    fn(doc["samples"], doc)
    json.dump(doc, open(p, "w"))
    return p


INDEX_FAULTS = {
    "offset": lambda s, d: s["offset"].__setitem__(2, s["offset"][2] + 512),
    "length": lambda s, d: s["length"].__setitem__(3, s["length"][3] - 512),
    "num_tokens": lambda s, d: s["num_tokens"].__setitem__(4, s["num_tokens"][4] + 300),
    "key": lambda s, d: s["key"].__setitem__(5, "other-key"),
    "swap": lambda s, d: (
        s["offset"].__setitem__(1, s["offset"][6]),
        s["length"].__setitem__(1, s["length"][6]),
    ),
    "dtype": lambda s, d: d.__setitem__("dtype", "uint8"),
}


def test_index_disagreeing_with_tar(clean, tmp_path):
    root0, samples = clean
    detected = 0
    for name, fault in INDEX_FAULTS.items():
        root = _copy(clean, tmp_path, name)
        _edit_index(root, 1, fault)
        got, stats, err = _read_all(root, "fail")
        assert isinstance(err, FormatError), name
        assert "shard-r00000-000001.tar" in str(err) and _one_line(err), (name, err)
        assert _differs(got, samples) == [], name
        if name != "dtype":
            assert "sample '" in str(err), (name, err)
        got, stats, err = _read_all(root, "skip")
        assert err is None and _differs(got, samples) == [] and len(stats.skipped_shards) == 1
        rep = verify(os.path.join(root, "index.json"))
        assert not rep["ok"], name
        lgot, lerr = _loader_read(root, "skip")
        assert lerr is None and all(ids == samples[k][0] for k, ids in lgot), name
        lgot, lerr = _loader_read(root, "fail")
        assert isinstance(lerr, FormatError) and "shard-r00000-000001" in str(lerr), name
        detected += 1
    record(
        "data",
        "index mismatch",
        injected=len(INDEX_FAULTS),
        tried=len(INDEX_FAULTS),
        detected=detected,
        note="offset, length, token count, key, swapped entry, dtype",
    )


def test_manifest_naming_a_missing_shard(clean, tmp_path):
    root0, samples = clean
    detected = cases = 0
    for what in ("tar", "index"):
        cases += 1
        root = _copy(clean, tmp_path, what)
        victim = _tars(root)[1] if what == "tar" else _tars(root)[1][:-4] + ".idx.json"
        os.remove(victim)
        name = os.path.basename(_tars(root0)[1])
        got, stats, err = _read_all(root, "fail")
        assert err is not None and name in str(err) and _one_line(err)
        got, stats, err = _read_all(root, "skip")
        assert err is None and _differs(got, samples) == []
        assert len(got) == len(samples) - 8 and name in stats.skipped_shards[0][0]
        rep = verify(os.path.join(root, "index.json"))
        assert not rep["ok"] and any(name in p for p in rep["problems"])
        with pytest.raises(MergeError, match="shard missing|without an index"):
            merge(root, save_path=os.path.join(root, "again.json"))
        lgot, lerr = _loader_read(root, "skip")  # replacements come from the next epoch
        lost = {k for k in samples if int(k[2:]) // 8 == 1}
        assert lerr is None and 0 < len(lgot) <= len(samples)
        assert all(ids == samples[k][0] and k not in lost for k, ids in lgot)
        lgot, lerr = _loader_read(root, "fail")
        assert lerr is not None and name in str(lerr)
        detected += 1
    record(
        "data",
        "missing shard",
        injected=cases,
        tried=cases,
        detected=detected,
        note="tar removed; index removed",
    )


def test_token_out_of_vocabulary(clean, tmp_path):
    """An id >= vocab_size with a matching checksum (a buggy writer, not a flipped byte): the
    fast path refuses the sample (it would index past the embedding table), verify reports it."""
    root0, samples = clean
    root = _copy(clean, tmp_path)
    tar = _tars(root)[2]
    sh = Shard.open(tar)
    data = bytearray(open(tar, "rb").read())
    i = 3
    p = sh.offsets[i] + 512
    start = p + 10 + (data[p + 8] | (data[p + 9] << 8))
    data[start + 2 : start + 4] = np.array([VOCAB + 5], "<u2").tobytes()
    open(tar, "wb").write(data)
    digest = hashlib.sha256(bytes(data)).hexdigest()
    _edit_index(root, 2, lambda s, d: d.__setitem__("sha256", digest))
    man = json.load(open(os.path.join(root, "index.json")))
    man["shards"][2]["sha256"] = digest
    json.dump(man, open(os.path.join(root, "index.json"), "w"))
    key = sh.keys[i]
    got, stats, err = _read_all(root, "fail", verify_checksums=True)
    assert isinstance(err, FormatError) and key in str(err) and "vocabulary" in str(err)
    assert os.path.basename(tar) in str(err) and _differs(got, samples) == []
    got, stats, err = _read_all(root, "skip")
    assert err is None and key not in [g[0] for g in got] and _differs(got, samples) == []
    with pytest.raises(FormatError, match="vocabulary"):
        Shard.open(tar).read(i)
    rep = verify(os.path.join(root, "index.json"))
    assert not rep["ok"] and any(key in p and "vocab" in p for p in rep["problems"])
    lgot, lerr = _loader_read(root, "skip")
    assert lerr is None and key not in [k for k, _ in lgot]
    assert all(max(ids) < VOCAB for _, ids in lgot)
    lgot, lerr = _loader_read(root, "fail")
    assert isinstance(lerr, FormatError) and key in str(lerr)
    record(
        "data",
        "token out of vocab",
        injected=1,
        tried=4,
        detected=1,
        note="reader fail/skip, Shard.read, verify, loader fail/skip",
    )


def test_merge_names_bad_indexes_and_keeps_entries_aligned(clean, tmp_path):
    """merge reports a damaged or hostile index by name (never a KeyError), refuses a shard
    name that leaves the folder and a manifest saved outside it, and with allow_incomplete
    pairs every remaining index with its own shard."""
    root0, samples = clean
    cases = 0
    for name, fault in {
        "no bytes": lambda s, d: d.pop("bytes"),
        "columns": lambda s, d: s.pop("offset"),
        "escape": lambda s, d: d.__setitem__("shard", "../../etc/passwd"),
        "not json": None,
    }.items():
        root = _copy(clean, tmp_path, name.replace(" ", "_"))
        if fault is None:
            p = sorted(os.path.join(root, f) for f in os.listdir(root) if f.endswith(".idx.json"))[0]
            open(p, "w").write("{not json")
        else:
            p = _edit_index(root, 0, fault)
        with pytest.raises(MergeError) as e:
            merge(root, save_path=os.path.join(root, "again.json"))
        assert os.path.basename(p) in str(e.value) and _one_line(e.value), (name, e.value)
        man = merge(root, save_path=os.path.join(root, "again.json"), allow_incomplete=True)
        assert [s["path"] for s in man["shards"]] == ["shard-r00000-000001.tar", "shard-r00000-000002.tar"], (
            name
        )
        assert [s["index"] for s in man["shards"]] == [
            "shard-r00000-000001.idx.json",
            "shard-r00000-000002.idx.json",
        ], name
        got = list(iter_samples(os.path.join(root, "again.json")))
        assert (
            len(got) == 16
            and _differs(
                [(g["__key__"], g["input_ids"].tolist(), g["labels"].tolist(), g["meta"]) for g in got],
                samples,
            )
            == []
        )
        cases += 1
    root = _copy(clean, tmp_path, "outside")
    with pytest.raises(MergeError, match="outside the folder of the manifest"):
        os.makedirs(tmp_path / "sibling")
        merge(root, save_path=str(tmp_path / "sibling" / "index.json"))
    cases += 1
    record(
        "data",
        "index mismatch",
        injected=cases,
        tried=cases,
        detected=cases,
        note="merge: index without bytes/columns, shard name with '..', non-JSON index, "
        "manifest saved outside the dataset folder",
    )
