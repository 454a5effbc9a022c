"""The shards through the real ``webdataset`` package: a user's own ``WebDataset(urls)`` with
``wds_tools.wds.decode_tokens``, and ``wds_tools.wds.token_pipeline``, both yielding exactly
what ``wds_tools.reader.iter_samples`` yields, composed with webdataset's own stages; never
unpickling; local, ``pipe:`` (opt-in), HTTP (nginx) and S3 (moto) URLs."""

from __future__ import annotations

import glob
import io
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from wds_tools.format import FormatError
from wds_tools.reader import iter_samples
from wds_tools.wds import (
    decode_tokens,
    pad_collate,
    register_gopen,
    select_members,
    shard_urls,
    token_pipeline,
)

from loader_fixtures import make_dataset
from servers import BUCKET

wds = pytest.importorskip("webdataset")

NUM = 50


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """(manifest, shard paths, {key: reference sample}): 50 samples in 4 uneven shards."""
    root = tmp_path_factory.mktemp("wdsint")
    manifest = make_dataset(str(root), "a", 0, NUM, shard_sizes=(15, 12, 13, 10))
    tars = sorted(glob.glob(os.path.join(root, "a", "*.tar")))
    ref = {s["__key__"]: s for s in iter_samples(manifest)}
    assert len(tars) == 4 and len(ref) == NUM
    return manifest, tars, ref


def _same(sample, ref) -> None:
    r = ref[sample["__key__"]]
    assert sample["input_ids"].dtype == r["input_ids"].dtype == np.uint16
    np.testing.assert_array_equal(sample["input_ids"], r["input_ids"])
    assert sample["labels"].dtype == np.int64
    np.testing.assert_array_equal(sample["labels"], r["labels"])
    assert sample["meta"] == r["meta"]
    assert sample["num_supervised"] == r["num_supervised"] == int((r["labels"] != -100).sum())


def _plain(tars, **kw):
    """A user's own pipeline: plain WebDataset, raw samples mapped through decode_tokens."""
    return wds.WebDataset(tars, shardshuffle=False, nodesplitter=wds.split_by_node, **kw).map(decode_tokens)


def test_plain_webdataset_yields_what_the_reader_yields(data):
    _, tars, ref = data
    got = list(_plain(tars))
    assert [s["__key__"] for s in got] == list(ref)  # same samples, same order
    for s in got:
        _same(s, ref)
        assert s["__url__"] in tars


def test_composes_with_shuffle_batched_with_epoch(data):
    _, tars, ref = data
    batches_per_pass = -(-NUM // 8)
    ds = _plain(tars).shuffle(20, seed=7).batched(8, collation_fn=pad_collate)
    one = list(ds.with_epoch(batches_per_pass))
    assert len(one) == batches_per_pass
    keys = [k for b in one for k in b["__key__"]]
    assert sorted(keys) == sorted(ref) and keys != list(ref)  # every sample once, shuffled
    for b in one:
        assert b["input_ids"].dtype == b["labels"].dtype == np.int64
        for row, key in enumerate(b["__key__"]):
            r, n = ref[key], int(b["lengths"][row])
            assert n == len(r["input_ids"]) == int(b["attention_mask"][row].sum())
            np.testing.assert_array_equal(b["input_ids"][row, :n], r["input_ids"])
            np.testing.assert_array_equal(b["labels"][row, :n], r["labels"])
            assert (b["labels"][row, n:] == -100).all() and (b["input_ids"][row, n:] == 0).all()
    # with_epoch(n) makes an epoch exactly n batches, going round the shards again as needed
    assert len(list(ds.with_epoch(batches_per_pass + 3))) == batches_per_pass + 3


def test_pad_collate_truncates_and_names_lengths(data):
    _, tars, ref = data
    samples = list(_plain(tars[:1]))[:4]
    b = pad_collate(samples, pad_id=7, max_seq_len=10)
    assert b["input_ids"].shape == (4, 10)
    for row, s in enumerate(samples):
        n = min(len(s["input_ids"]), 10)
        assert b["lengths"][row] == n == b["attention_mask"][row].sum()
        np.testing.assert_array_equal(b["labels"][row, :n], ref[s["__key__"]]["labels"][:n])
        assert (b["input_ids"][row, n:] == 7).all()
    with pytest.raises(ValueError, match="max_seq_len must be >= 1"):
        pad_collate(samples, max_seq_len=0)


def test_token_pipeline_reads_a_manifest_and_shuffles_repeatably(data):
    manifest, tars, ref = data
    assert shard_urls(manifest) == tars
    got = list(token_pipeline(manifest))
    assert [s["__key__"] for s in got] == list(ref)
    for s in got:
        _same(s, ref)
    a = [s["__key__"] for s in token_pipeline(manifest, shuffle=16, shardshuffle=4, seed=1)]
    b = [s["__key__"] for s in token_pipeline(manifest, shuffle=16, shardshuffle=4, seed=1)]
    assert a == b and a != list(ref) and sorted(a) == sorted(ref)


def test_split_by_node_and_worker_partition_the_shards(data, monkeypatch):
    manifest, _, ref = data
    seen = []
    for rank in range(2):
        for worker in range(2):
            env = {"RANK": rank, "WORLD_SIZE": 2, "WORKER": worker, "NUM_WORKERS": 2}
            for k, v in env.items():
                monkeypatch.setenv(k, str(v))
            keys = [s["__key__"] for s in token_pipeline(manifest)]
            assert keys, f"rank {rank} worker {worker} got no shard"
            seen.extend(keys)
    assert sorted(seen) == sorted(ref)  # disjoint, nothing lost


class _Touch:
    """Unpickling this creates an empty file: the stand-in for a malicious payload."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def _with_pickle_member(src: str, dst: str, payload: bytes) -> str:
    """Copy shard ``src`` to ``dst`` with ``KEY.pickle`` added to its first sample."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w", format=tarfile.USTAR_FORMAT) as tout:
        members = tin.getmembers()
        for m in members:
            tout.addfile(m, tin.extractfile(m))
            if m.name == members[1].name:  # after the first sample's .json
                ti = tarfile.TarInfo(members[0].name.split(".")[0] + ".pickle")
                ti.size = len(payload)
                tout.addfile(ti, io.BytesIO(payload))
    return dst


def test_a_pickle_member_is_never_unpickled(data, tmp_path):
    _, tars, ref = data
    marker = tmp_path / "unpickled"
    shard = _with_pickle_member(tars[0], str(tmp_path / "evil.tar"), pickle.dumps(_Touch(str(marker))))
    for ds in (_plain([shard]), _plain([shard], select_files=select_members), token_pipeline(shard)):
        got = list(ds)
        assert len(got) == 15
        for s in got:
            _same(s, ref)
            assert "pickle" not in s
    assert not marker.exists()
    # control (the payload is live): webdataset's own default .decode() runs it
    list(wds.WebDataset([shard], shardshuffle=False).decode())
    assert marker.exists()


def test_bad_samples_fail_with_a_named_error(data):
    tars = data[1]
    raw = next(iter(wds.WebDataset(tars[:1], shardshuffle=False)))
    with pytest.raises(FormatError, match=r"sample 'a-000000': lacks its json member"):
        decode_tokens({k: v for k, v in raw.items() if k != "json"})
    with pytest.raises(FormatError, match=r"without webdataset's \.decode\(\)"):
        decode_tokens(dict(raw, json={"supervised": []}))
    obj = io.BytesIO()
    np.save(obj, np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(FormatError, match="input_ids.npy is not a .npy array"):
        decode_tokens(dict(raw, **{"input_ids.npy": obj.getvalue()}))  # refused, not unpickled
    with pytest.raises(FormatError, match="bad supervised span"):
        decode_tokens(dict(raw, json=b'{"supervised": [[0, 100000]], "meta": {}}'))


def test_truncated_shard_fails_or_skips_by_policy(data, tmp_path, caplog):
    _, tars, ref = data
    cut = tmp_path / "cut.tar"
    body = Path(tars[0]).read_bytes()
    cut.write_bytes(body[: len(body) // 2])
    with pytest.raises(tarfile.ReadError, match="unexpected end of data"):
        list(token_pipeline([str(cut), tars[1]]))
    got = list(token_pipeline([str(cut), tars[1]], on_error="skip"))
    keys, n = [s["__key__"] for s in got], len(got) - 12
    # whole samples of the cut shard up to the cut, then the next shard, whole
    assert 0 < n < 15 and keys == list(ref)[:n] + list(ref)[15:27]
    for s in got:
        _same(s, ref)  # no partial sample
    assert "skipping" in caplog.text


def test_pipe_urls_need_allow_pipe(data):
    _, tars, ref = data
    with pytest.raises(ValueError, match="refusing to run shell URL"):
        list(token_pipeline(f"pipe:cat {tars[3]}"))
    got = list(token_pipeline(f"pipe:cat {tars[3]}", allow_pipe=True))
    assert [s["__key__"] for s in got] == list(ref)[40:]


def test_import_needs_neither_torch_nor_webdataset():
    code = (
        "import sys, wds_tools.wds; "
        "assert 'torch' not in sys.modules and 'webdataset' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'webdataset'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_token_pipeline_works_without_torch(data):
    """webdataset falls back to stand-ins when torch is missing (ModuleNotFoundError)."""
    manifest, _, ref = data
    code = f"""
import sys
class _NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _NoTorch())
from wds_tools.wds import pad_collate, token_pipeline
batches = list(token_pipeline({manifest!r}, shuffle=8, seed=0).batched(8, pad_collate))
assert sum(len(b["__key__"]) for b in batches) == {len(ref)}, batches
assert "torch" not in sys.modules and "webdataset" in sys.modules
"""
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.network
def test_http_through_nginx(remote_dataset, nginx):
    ref = {s["__key__"]: s for s in iter_samples(os.path.join(remote_dataset, "ds", "index.json"))}
    got = list(token_pipeline(f"{nginx.url}/ds/index.json"))
    assert [s["__key__"] for s in got] == list(ref)
    for s in got:
        _same_remote(s, ref)
    if shutil.which("curl"):  # a user's own WebDataset over the same URLs (its curl opener)
        urls = shard_urls(f"{nginx.url}/ds/index.json")
        assert [s["__key__"] for s in _plain(urls)] == list(ref)


@pytest.mark.network
def test_s3_through_moto(remote_dataset, s3_env):
    import importlib

    wgopen = importlib.import_module("webdataset.gopen")

    ref = {s["__key__"]: s for s in iter_samples(os.path.join(remote_dataset, "ds", "index.json"))}
    got = list(token_pipeline(f"s3://{BUCKET}/ds/index.json"))
    assert [s["__key__"] for s in got] == list(ref)
    for s in got:
        _same_remote(s, ref)
    # a plain WebDataset has no s3:// opener until register_gopen installs this transport
    urls = shard_urls(f"s3://{BUCKET}/ds/index.json")
    saved = dict(wgopen.gopen_schemes)
    with pytest.raises(ValueError, match="no gopen handler"):
        list(_plain(urls[:1]))
    try:
        assert register_gopen() == {"s3": None}
        keys = [s["__key__"] for s in _plain(urls)]
    finally:
        wgopen.gopen_schemes.clear()
        wgopen.gopen_schemes.update(saved)
    assert keys == list(ref)


def _same_remote(sample, ref) -> None:
    r = ref[sample["__key__"]]
    np.testing.assert_array_equal(sample["input_ids"], r["input_ids"])
    np.testing.assert_array_equal(sample["labels"], r["labels"])
    assert sample["meta"] == r["meta"]


@pytest.mark.slow
def test_dataloader_workers_split_the_shards(data):
    torch = pytest.importorskip("torch")
    manifest, _, ref = data
    ds = token_pipeline(manifest).batched(4, collation_fn=pad_collate)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    keys = []
    for b in loader:
        assert isinstance(b["input_ids"], torch.Tensor) and b["input_ids"].dtype == torch.int64
        keys.extend(b["__key__"])
    assert sorted(keys) == sorted(ref)
