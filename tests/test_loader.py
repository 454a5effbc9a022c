"""The streaming loader end to end on small real datasets: batch contents, mixture, epochs,
distribution over ranks and workers, exact resume, corrupt shards, laziness."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
import torch

from wds_tools.config import load_data_config
from wds_tools.format import FormatError
from wds_tools.loader import build_loader

from loader_fixtures import key_number, make_dataset, write_config

SIZES = {"big": 3000, "mid": 300, "tiny": 40}


@pytest.fixture(scope="session")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("loader_data"))
    m = {
        "big": make_dataset(root, "big", 0, 3000, samples_per_shard=400),
        "mid": make_dataset(root, "mid", 1, 300, shard_sizes=[7, 93, 150, 50]),
        "tiny": make_dataset(root, "tiny", 2, 40, samples_per_shard=6),
        # for the distributed test: uneven shard counts and sizes
        "d0": make_dataset(root, "d0", 3, 403, shard_sizes=[100, 3, 250, 50]),
        "d1": make_dataset(root, "d1", 4, 130, samples_per_shard=7),
        "d2": make_dataset(root, "d2", 5, 37, samples_per_shard=5),
    }
    return root, m


def mix_config(data, tmp_path, weights=(0.7, 0.2, 0.1), **top):
    root, m = data
    ds = [{"manifest": m[n], "weight": w} for n, w in zip(("big", "mid", "tiny"), weights)]
    top.setdefault("shuffle", {"block_size": 16, "window_blocks": 4})
    return load_data_config(write_config(str(tmp_path / "mix.yaml"), ds, **top))


def index_of(data):
    """key -> (input_ids, labels) of every sample, read with the plain reader."""
    from wds_tools.reader import iter_samples

    out = {}
    for man in data[1].values():
        for s in iter_samples(man):
            out[s["__key__"]] = (np.asarray(s["input_ids"], np.int64), s["labels"])
    return out


def test_batches_hold_the_samples_their_keys_name(data, tmp_path):
    truth = index_of(data)
    loader = build_loader(
        mix_config(data, tmp_path),
        rank=0,
        world_size=1,
        batch_size=4,
        num_workers=0,
        max_seq_len=40,
        pad_id=0,
    )
    it = iter(loader)
    for _ in range(30):
        b = next(it)
        assert set(b) == {"input_ids", "labels", "attention_mask", "lengths", "dataset", "__key__", "epoch"}
        assert b["input_ids"].dtype == torch.int64 and b["input_ids"].shape[0] == 4
        for r, key in enumerate(b["__key__"]):
            ids, labels = truth[key]
            n = min(len(ids), 40)
            assert int(b["lengths"][r]) == n
            assert b["dataset"][r] == key.split("-")[0]
            assert b["attention_mask"][r].tolist() == [1] * n + [0] * (b["input_ids"].shape[1] - n)
            assert b["input_ids"][r, :n].tolist() == ids[:n].tolist()
            assert (b["input_ids"][r, n:] == 0).all()
            assert b["labels"][r, :n].tolist() == labels[:n].tolist()
            assert (b["labels"][r, n:] == -100).all()


def rank_stream(loader, num_batches):
    it = iter(loader)
    return [next(it) for _ in range(num_batches)]


@pytest.mark.slow  # DataLoader workers
def test_every_prefix_tracks_sample_weights_over_very_different_sizes(data, tmp_path):
    w = np.array([0.7, 0.2, 0.1])
    loader = build_loader(
        mix_config(data, tmp_path), rank=0, world_size=1, batch_size=8, num_workers=2, max_seq_len=64
    )
    names = ["big", "mid", "tiny"]
    counts, n, worst = np.zeros(3), 0, 0.0
    for b in rank_stream(loader, 150):  # 1,200 samples
        for d in b["dataset"]:
            counts[names.index(d)] += 1
            n += 1
            worst = max(worst, float(np.abs(counts - w * n).max()))
    # each canonical partition is within one sample of the weights; a rank's micro-batches
    # interleave its partitions (6 here), whose mixers start phase-shifted
    assert worst <= 4.0, worst
    st = loader.stats()
    assert [d["samples"] for d in st["datasets"]] == counts.tolist()
    # 120 "tiny" samples over 2 readers of 20 per epoch: it wrapped (a new shuffled epoch)...
    assert st["datasets"][2]["epoch"] >= 2
    assert st["datasets"][0]["epoch"] == 0  # ...while the big one continues its first epoch


@pytest.mark.slow  # DataLoader workers
def test_token_weighting_tracks_token_shares(data, tmp_path):
    w = np.array([0.5, 0.3, 0.2])
    cfg = mix_config(data, tmp_path, weights=(0.5, 0.3, 0.2), weight_by="tokens")
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=8, num_workers=2, max_seq_len=48)
    names = ["big", "mid", "tiny"]
    tok, worst = np.zeros(3), 0.0
    for b in rank_stream(loader, 150):
        lens = b["attention_mask"].sum(1).tolist()
        for d, n in zip(b["dataset"], lens):
            tok[names.index(d)] += n
            worst = max(worst, float(np.abs(tok - w * tok.sum()).max()))
    # each partition is within one (truncated) sample's tokens; a rank interleaves 6 of them
    assert worst <= 4 * 48, worst
    assert np.abs(tok / tok.sum() - w).max() < 0.01


@pytest.mark.slow  # DataLoader workers
def test_one_bounded_epoch_reads_every_sample_once(data, tmp_path):
    root, m = data
    cfg = load_data_config(
        write_config(
            str(tmp_path / "b.yaml"),
            [
                {"manifest": m["mid"], "weight": 2, "max_epochs": 1},
                {"manifest": m["tiny"], "weight": 1, "max_epochs": 1},
            ],
            shuffle={"block_size": 8},
            partitions=2,
        )
    )
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=5, num_workers=2, max_seq_len=64)
    keys = [k for b in loader for k in b["__key__"]]
    # 2 partitions: each owns 150 of "mid" and 20 of "tiny" = 170 samples; 340 = 68 batches of 5
    assert len(loader) == 68 and len(keys) == 340 == len(set(keys))
    assert {k for k in keys if k.startswith("mid")} == {f"mid-{i:06d}" for i in range(300)}
    assert len({k for k in keys if k.startswith("tiny")}) == 40


@pytest.mark.slow  # DataLoader workers
def test_epochs_reshuffle_and_seeds_change_the_order(data, tmp_path):
    root, m = data
    cfg = load_data_config(
        write_config(
            str(tmp_path / "e.yaml"),
            [{"manifest": m["mid"], "weight": 1, "max_epochs": 2}],
            shuffle={"block_size": 8},
        )
    )
    keys = [k for b in build_loader(cfg, batch_size=10, max_seq_len=64) for k in b["__key__"]]
    e0, e1 = keys[:300], keys[300:]
    assert sorted(e0) == sorted(e1) and e0 != e1
    # shuffled, yet each block of 8 is one sequential read: most neighbours share a shard run
    other = [k for b in build_loader(cfg, batch_size=10, max_seq_len=64, seed=99) for k in b["__key__"]]
    assert other[:300] != e0 and sorted(other[:300]) == sorted(e0)


def _distributed_worker(rank, world, cfg_path, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.multiprocessing.set_start_method("fork", force=True)  # DataLoader workers: fast start
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        loader = build_loader(cfg_path, batch_size=3, num_workers=2, max_seq_len=32)
        batches = [b["__key__"] for b in loader]
        states = loader.gather_state_dicts()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(
                {
                    "rank": loader.rank,
                    "world": loader.world_size,
                    "batches": batches,
                    "len": len(loader),
                    "states": len(states["ranks"]),
                },
                f,
            )
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_two_workers_equal_batches_disjoint_complete(data, tmp_path):
    import socket

    import torch.multiprocessing as mp

    root, m = data
    cfg = write_config(
        str(tmp_path / "dist.yaml"),
        [
            {"manifest": m["d0"], "weight": 5, "max_epochs": 1},
            {"manifest": m["d1"], "weight": 2, "max_epochs": 1},
            {"manifest": m["d2"], "weight": 1, "max_epochs": 1},
        ],
        shuffle={"block_size": 8},
        partitions=4,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_distributed_worker, args=(2, cfg, port, str(tmp_path)), nprocs=2, join=True)
    res = [json.load(open(tmp_path / f"rank{r}.json")) for r in range(2)]
    assert [r["rank"] for r in res] == [0, 1] and res[0]["world"] == 2 and res[0]["states"] == 2
    # 4 partitions of 100 + 32 + 9 = 141 samples: 564 = 94 global micro-batches of 2 x 3
    assert len(res[0]["batches"]) == len(res[1]["batches"]) == res[0]["len"] == 94
    keys = [k for r in res for b in r["batches"] for k in b]
    assert len(keys) == len(set(keys))  # disjoint across ranks and workers
    for name, n in (("d0", 403), ("d1", 130), ("d2", 37)):
        got = {key_number(k) for k in keys if k.startswith(name + "-")}
        assert got <= set(range(n)) and len(got) == n - n % 4  # only the documented remainder


_WORKERS = pytest.mark.slow  # DataLoader workers


@pytest.mark.parametrize(
    "num_workers, pack, weight_by, stop",
    [
        (0, False, "samples", 7),
        pytest.param(2, False, "samples", 5, marks=_WORKERS),
        pytest.param(2, False, "tokens", 6, marks=_WORKERS),
        pytest.param(3, True, "samples", 7, marks=_WORKERS),
    ],
)
def test_resume_yields_exactly_the_uninterrupted_batches(data, tmp_path, num_workers, pack, weight_by, stop):
    cfg = mix_config(data, tmp_path, weight_by=weight_by)
    kw = dict(
        rank=0,
        world_size=1,
        batch_size=4,
        num_workers=num_workers,
        max_seq_len=48,
        pack=pack,
        transfer_batches=2,
    )
    full = rank_stream(build_loader(cfg, **kw), 16)
    first = build_loader(cfg, **kw)
    it = iter(first)
    for _ in range(stop):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    again = build_loader(cfg, **kw)
    again.load_state_dict(state)
    rest = rank_stream(again, 16 - stop)
    for a, b in zip(full[stop:], rest):
        assert a["__key__"] == b["__key__"]
        for f in ("input_ids", "labels", "attention_mask"):
            assert torch.equal(a[f], b[f])
        if pack:
            assert torch.equal(a["position_ids"], b["position_ids"])


def test_a_state_loads_under_another_layout_only_whole(data, tmp_path):
    cfg = mix_config(data, tmp_path)
    kw = dict(batch_size=4, num_workers=2, output="numpy")
    los = [
        build_loader(cfg, world_size=2, rank=r, num_workers=0, batch_size=4, output="numpy") for r in range(2)
    ]
    for lo in los:
        next(iter(lo))
    sds = [lo.state_dict() for lo in los]
    assert los[0].num_partitions == 12  # 6 per rank of the first layout
    # one rank's state holds only its own partitions: enough for a rank that serves a subset of
    # them (rank 1 of 4: partitions 1, 5, 9), not for one that serves others
    build_loader(cfg, world_size=4, rank=1, **kw).load_state_dict(sds[1])
    with pytest.raises(ValueError, match="gather_state_dicts"):
        build_loader(cfg, world_size=4, rank=0, **kw).load_state_dict(sds[1])
    with pytest.raises(ValueError, match="does not divide the run's 12 partitions"):
        build_loader(cfg, world_size=5, rank=1, batch_size=4, output="numpy").load_state_dict({"ranks": sds})
    with pytest.raises(ValueError, match="version"):
        build_loader(cfg, world_size=2, rank=1, **kw).load_state_dict(dict(sds[1], version=1))
    with pytest.raises(ValueError, match="seed"):
        build_loader(cfg, world_size=2, rank=1, seed=7, **kw).load_state_dict({"ranks": sds})
    with pytest.raises(ValueError, match="partitions=24"):
        build_loader(cfg, world_size=2, rank=1, partitions=24, **kw).load_state_dict({"ranks": sds})
    ok = build_loader(cfg, world_size=3, rank=2, batch_size=2, output="numpy")
    ok.load_state_dict({"ranks": sds})  # 3 ranks x 4 partitions: loads
    assert ok.num_partitions == 12 and ok.batches_delivered == 1


def _truncate_shard(src_manifest, dst_root):
    """Copy a dataset and cut its second shard in the middle of its 10th sample."""
    import shutil

    src = os.path.dirname(src_manifest)
    dst = os.path.join(dst_root, "broken")
    shutil.copytree(src, dst)
    man = json.load(open(os.path.join(dst, "index.json")))
    shard = man["shards"][1]
    idx = json.load(open(os.path.join(dst, shard["index"])))
    cut = idx["samples"]["offset"][9] + idx["samples"]["length"][9] // 2
    with open(os.path.join(dst, shard["path"]), "r+b") as f:
        f.truncate(cut)
    return os.path.join(dst, "index.json"), set(idx["samples"]["key"])


@pytest.mark.parametrize("num_workers", [0, pytest.param(2, marks=_WORKERS)])
def test_truncated_shard_policies(data, tmp_path, num_workers):
    root, m = data
    broken, broken_keys = _truncate_shard(m["mid"], str(tmp_path))
    truth = index_of(data)

    def cfg(policy):
        return load_data_config(
            write_config(
                str(tmp_path / f"{policy}.yaml"),
                [{"manifest": broken, "weight": 1, "max_epochs": 1}],
                on_error=policy,
                shuffle={"block_size": 8, "window_blocks": 2},
            )
        )

    with pytest.raises(FormatError, match="truncated"):
        for _ in build_loader(cfg("fail"), batch_size=4, num_workers=num_workers, max_seq_len=64):
            pass
    loader = build_loader(cfg("skip"), batch_size=4, num_workers=num_workers, max_seq_len=64)
    keys = []
    for b in loader:
        for r, k in enumerate(b["__key__"]):  # every sample is whole and is the one named
            ids = truth[k][0]
            assert b["input_ids"][r, : len(ids)].tolist() == ids.tolist()
            assert int(b["attention_mask"][r].sum()) == len(ids)
            keys.append(k)
    st = loader.stats()
    assert st["skipped_shards"] >= 1 and st["datasets"][0]["skipped_samples"] >= 84
    assert not {f"mid-{i:06d}" for i in range(16, 100)} & set(keys)  # after the cut: never
    # batch counts stay as planned: skipped samples are replaced from the next epoch (which
    # may repeat samples of this one, and at most that many)
    assert len(keys) == 4 * len(loader)
    assert len(keys) - len(set(keys)) <= st["datasets"][0]["skipped_samples"]


def test_a_huge_manifest_is_planned_lazily(data, tmp_path, monkeypatch):
    """10,000 shards / 4 million samples: no shard index is read up front."""
    from wds_tools import stream as L

    big = json.load(open(data[1]["big"]))
    one = dict(big["shards"][0])
    one["path"] = os.path.join(os.path.dirname(data[1]["big"]), one["path"])
    one["index"] = os.path.join(os.path.dirname(data[1]["big"]), one["index"])
    big["shards"] = [one] * 10_000
    big["num_samples"], big["num_tokens"] = 10_000 * one["num_samples"], 10_000 * one["num_tokens"]
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(big))
    opened = []
    real_open = L.Shard.open
    monkeypatch.setattr(
        L.Shard, "open", classmethod(lambda cls, *a, **k: opened.append(a[0]) or real_open(*a, **k))
    )
    cfg = load_data_config(write_config(str(tmp_path / "huge.yaml"), [{"manifest": str(path)}]))
    t = time.perf_counter()
    loader = build_loader(cfg, batch_size=16, num_workers=0, max_seq_len=64)
    b = next(iter(loader))
    assert (
        time.perf_counter() - t < 10.0
    )  # laziness is the open count below; this only catches O(shards) work
    # each of the rank's partitions opened at most its first window's shards
    assert b["input_ids"].shape[0] == 16 and len(opened) <= loader.num_partitions * cfg.shuffle.window_blocks


@pytest.mark.slow  # DataLoader workers
@pytest.mark.parametrize("shards,batch_size", [(20, 4), (20, 7), (3, 5), (7, 16)])
def test_bounded_two_workers_deliver_every_batch_in_turn(tmp_path, shards, batch_size):
    """The reported AssertionError (1, 0) (2 workers, max_epochs 1, 20 shards): every batch of a
    bounded stream arrives in worker turn order, whole and resumed, for several shard counts."""
    sizes = [23 + (i % 5) for i in range(shards)]
    man = make_dataset(str(tmp_path), "b", 0, sum(sizes), shard_sizes=sizes)
    cfg = load_data_config(
        write_config(
            str(tmp_path / "b.yaml"),
            [{"manifest": man, "weight": 1, "max_epochs": 1}],
            shuffle={"block_size": 8},
        )
    )

    def loader():
        return build_loader(cfg, batch_size=batch_size, num_workers=2, max_seq_len=64, transfer_batches=3)

    full = [b["__key__"] for b in loader()]
    assert len(full) == len(loader()) > 0
    for k in (1, len(full) // 2, len(full) - 1):
        first = loader()
        got = []
        for b in first:
            got.append(b["__key__"])
            if len(got) == k:
                break
        second = loader()
        second.load_state_dict(first.state_dict())
        assert got + [b["__key__"] for b in second] == full


@pytest.mark.slow  # DataLoader workers
def test_an_older_iterator_cannot_continue_after_a_newer_one(data, tmp_path):
    loader = build_loader(mix_config(data, tmp_path), batch_size=4, num_workers=2, max_seq_len=40)
    old = iter(loader)
    next(old)
    new = iter(loader)
    first_new = next(new)
    with pytest.raises(RuntimeError, match="iterated again"):
        next(old)
    # the newer iterator goes on, exactly where the last delivered batch left off
    ref = build_loader(mix_config(data, tmp_path), batch_size=4, num_workers=2, max_seq_len=40)
    it = iter(ref)
    want = [next(it)["__key__"] for _ in range(4)]
    assert [first_new["__key__"], next(new)["__key__"], next(new)["__key__"]] == want[1:]
