"""Token-budget micro-batches (``build_loader(..., max_tokens=N)``): every batch's padded
``rows x longest row`` within the budget, greedy, exact resume, equal and lossless splits over
ranks and workers, shares that follow the weights, and the refusals that keep ranks in step."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from wds_tools.config import load_data_config
from wds_tools.loader import build_loader
from wds_tools.reader import iter_samples
from wds_tools.stream import NumpyBackend, build_stream
from wds_tools.stream_cli import main as stream_main

from loader_fixtures import make_dataset, write_config

BUDGET, CAP, ROWS = 256, 128, 64


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("token_budget"))
    m = {
        "short": make_dataset(root, "short", 0, 600, shard_sizes=[250, 13, 337], min_len=4, max_len=24),
        "long": make_dataset(root, "long", 1, 403, shard_sizes=[100, 3, 250, 50], min_len=40, max_len=200),
        "mid": make_dataset(root, "mid", 2, 150, samples_per_shard=40, min_len=20, max_len=60),
    }
    truth = {}
    for man in m.values():
        for s in iter_samples(man):
            truth[s["__key__"]] = (np.asarray(s["input_ids"], np.int64), s["labels"])
    return root, m, truth


def config(data, tmp_path, names=("short", "long"), weights=(0.5, 0.5), groups=None, **top):
    root, m, _ = data
    ds = [{"manifest": m[n], "weight": w} for n, w in zip(names, weights)]
    for d, g in zip(ds, groups or ()):
        d["group"] = g
    top.setdefault("shuffle", {"block_size": 16, "window_blocks": 4})
    return load_data_config(write_config(str(tmp_path / "budget.yaml"), ds, **top))


def take(loader, n):
    out = []
    for b in loader:
        out.append(b)
        if len(out) == n:
            break
    return out


def test_every_batch_is_within_the_budget_greedy_and_holds_its_samples(data, tmp_path):
    truth = data[2]
    # two groups (never in one batch): short samples make wide batches, long ones narrow
    cfg = config(data, tmp_path, groups=("chat", "t2i"))
    loader = build_loader(
        cfg,
        rank=0,
        world_size=1,
        batch_size=ROWS,
        num_workers=0,
        max_seq_len=CAP,
        max_tokens=BUDGET,
        output="numpy",
    )
    batches = take(loader, 80)
    widths = {"short": set(), "long": set()}
    for i, b in enumerate(batches):
        rows, t = b["input_ids"].shape
        assert len(set(b["dataset"])) == 1
        widths[b["dataset"][0]].add(rows)
        assert rows * t <= BUDGET and 1 <= rows <= ROWS
        assert len(b["__key__"]) == rows == len(b["lengths"])
        assert t == int(b["lengths"].max())
        for r, key in enumerate(b["__key__"]):  # the row is its sample, truncated to CAP
            ids, labels = truth[key]
            n = min(len(ids), CAP)
            assert int(b["lengths"][r]) == n
            assert np.array_equal(b["input_ids"][r, :n], ids[:n])
            assert np.array_equal(b["labels"][r, :n], labels[:n])
            assert not b["attention_mask"][r, n:].any() and (b["labels"][r, n:] == -100).all()
        later = [c for c in batches[i + 1 :] if c["dataset"][0] == b["dataset"][0]]
        if later:  # greedy: the group's next sample (its next batch's first) did not fit here
            first = min(len(truth[later[0]["__key__"][0]][0]), CAP)
            assert rows == ROWS or (rows + 1) * max(t, first) > BUDGET
    assert min(widths["short"]) >= BUDGET // 24 and max(widths["long"]) <= BUDGET // 40
    assert loader.num_batches is None


def test_a_sample_longer_than_the_budget_is_truncated_to_it(data, tmp_path):
    truth = data[2]
    loader = build_loader(
        config(data, tmp_path, names=("long",), weights=(1,)),
        rank=0,
        world_size=1,
        batch_size=8,
        num_workers=0,
        max_seq_len=4096,
        max_tokens=50,
        output="numpy",
    )
    cut = 0
    for b in take(loader, 40):
        assert b["input_ids"].shape[0] * b["input_ids"].shape[1] <= 50
        for r, key in enumerate(b["__key__"]):
            ids = truth[key][0]
            assert int(b["lengths"][r]) == min(len(ids), 50)
            assert np.array_equal(b["input_ids"][r, : min(len(ids), 50)], ids[:50])
            cut += len(ids) > 50
    assert cut > 0 and loader.stats()["truncated_tokens"] > 0


def _same(a, b):
    assert a["__key__"] == b["__key__"] and a["dataset"] == b["dataset"]
    for f in ("input_ids", "labels", "attention_mask", "lengths"):
        assert np.array_equal(np.asarray(a[f]), np.asarray(b[f]))


@pytest.mark.parametrize(
    "num_workers, weight_by, stop",
    [(0, "samples", 7), (0, "tokens", 11), pytest.param(2, "samples", 5, marks=pytest.mark.slow)],
)  # DataLoader workers
def test_resume_yields_exactly_the_uninterrupted_batches(data, tmp_path, num_workers, weight_by, stop):
    cfg = config(data, tmp_path, names=("short", "long", "mid"), weights=(0.5, 0.3, 0.2), weight_by=weight_by)
    kw = dict(
        rank=1,
        world_size=2,
        batch_size=ROWS,
        num_workers=num_workers,
        max_seq_len=CAP,
        max_tokens=BUDGET,
        transfer_batches=3,
        output="torch" if num_workers else "numpy",
    )
    full = take(build_loader(cfg, **kw), 20)
    first = build_loader(cfg, **kw)
    it = iter(first)
    for _ in range(stop):  # stop mid-turn of a worker (turns are 3 batches)
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it
    assert state["layout"]["max_tokens"] == BUDGET
    again = build_loader(cfg, **kw)
    again.load_state_dict(state)
    rest = take(again, 20 - stop)
    assert len(rest) == 20 - stop
    for a, b in zip(full[stop:], rest):
        _same(a, b)
    for b in full:
        assert b["input_ids"].shape[0] * b["input_ids"].shape[1] <= BUDGET


def _simulated(cfg, rank, n, **kw):
    """The first ``n`` micro-batches of one rank, its workers run in this process (no torch),
    and the loader."""
    loader = build_stream(cfg, rank=rank, backend=NumpyBackend(simulate_workers=True), **kw)
    return take(loader, n), loader


def test_two_ranks_two_workers_read_each_epoch_once(data, tmp_path):
    _, m, truth = data
    cfg = config(data, tmp_path, names=("long",), weights=(1,))
    kw = dict(world_size=2, num_workers=2, batch_size=ROWS, max_seq_len=CAP, max_tokens=BUDGET)
    n = 403
    epoch0 = []
    for rank in range(2):
        got, loader = _simulated(cfg, rank, 150, **kw)
        assert all(len(b["__key__"]) * b["input_ids"].shape[1] <= BUDGET for b in got)
        epoch0 += [k for b in got for k, e in zip(b["__key__"], b["epoch"]) if e == 0]
        parts = loader.state_dict()["parts"]
        assert len(parts) == loader.num_partitions // 2  # every partition of the rank took part...
        assert all(p["datasets"]["long"]["reader"][0] >= 1 for p in parts.values())  # ...into epoch 1
    K = loader.num_partitions
    assert len(epoch0) == len(set(epoch0)) == n - n % K  # nothing repeated or lost
    assert set(epoch0) <= {k for k in truth if k.startswith("long-")}


@pytest.mark.slow  # DataLoader workers
def test_ranks_get_the_batches_their_workers_plan(data, tmp_path):
    """Through real workers and transfer batches, each rank delivers the micro-batches its
    workers build in turn (worker u % 2 builds micro-batch u whole); both ranks always have a
    next batch (an unbounded stream)."""
    cfg = config(data, tmp_path, names=("short", "long"), weights=(0.6, 0.4))
    kw = dict(world_size=2, num_workers=2, batch_size=ROWS, max_seq_len=CAP, max_tokens=BUDGET)
    for rank in range(2):
        got = take(build_loader(cfg, rank=rank, transfer_batches=3, output="numpy", **kw), 12)
        assert len(got) == 12
        want, _ = _simulated(cfg, rank, 12, transfer_batches=3, **kw)
        for b, p in zip(got, want):
            assert b["__key__"] == p["__key__"] and b["input_ids"].shape == p["input_ids"].shape
            assert np.array_equal(b["input_ids"], p["input_ids"])


def test_bounded_streams_and_packing_are_refused(data, tmp_path):
    cfg = config(data, tmp_path)
    with pytest.raises(ValueError, match="unbounded stream"):  # ranks could disagree at the end
        build_loader(cfg, batch_size=8, max_tokens=BUDGET, max_epochs=1, output="numpy")
    with pytest.raises(ValueError, match="pack"):
        build_loader(cfg, batch_size=8, max_tokens=BUDGET, pack=True, output="numpy")
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError, match="max_tokens must be an integer"):
            build_loader(cfg, batch_size=8, max_tokens=bad, output="numpy")


def test_a_state_loads_under_another_budget_with_nothing_repeated(data, tmp_path):
    cfg = config(data, tmp_path, names=("long",), weights=(1,))
    kw = dict(rank=0, world_size=1, batch_size=ROWS, max_seq_len=CAP, output="numpy")
    first = build_loader(cfg, max_tokens=BUDGET, **kw)
    a = take(first, 30)
    after = build_loader(cfg, max_tokens=2 * BUDGET, **kw)  # a wider budget from here on
    after.load_state_dict(first.state_dict())
    b = take(after, 30)
    assert max(len(x["__key__"]) * x["input_ids"].shape[1] for x in b) > BUDGET  # the new budget
    keys = [k for x in a + b for k, e in zip(x["__key__"], x["epoch"]) if e == 0]
    assert len(keys) == len(set(keys))  # nothing of epoch 0 twice across the change
    plain = build_loader(cfg, **kw)  # and fixed-size micro-batches continue too
    plain.load_state_dict(after.state_dict())
    c = take(plain, 5)
    assert all(len(x["__key__"]) == ROWS for x in c)


@pytest.mark.parametrize("weight_by", ["samples", "tokens"])
def test_realized_shares_follow_the_weights(data, tmp_path, weight_by):
    weights = (0.6, 0.3, 0.1)
    cfg = config(data, tmp_path, names=("short", "long", "mid"), weights=weights, weight_by=weight_by)
    loader = build_loader(
        cfg,
        rank=0,
        world_size=1,
        batch_size=ROWS,
        num_workers=0,
        max_seq_len=CAP,
        max_tokens=BUDGET,
        output="numpy",
    )
    samples, tokens = Counter(), Counter()
    for b in take(loader, 250):
        for d, n in zip(b["dataset"], b["lengths"].tolist()):
            samples[d] += 1
            tokens[d] += n
    got = samples if weight_by == "samples" else tokens
    total = sum(got.values())
    for name, w in zip(("short", "long", "mid"), weights):
        assert abs(got[name] / total - w) < 0.01, (name, got[name] / total, w)
    st = {d["name"]: d for d in loader.stats()["datasets"]}
    assert st["short"]["samples"] == samples["short"]


def test_stream_cli_replays_budget_batches(data, tmp_path):
    config(data, tmp_path)
    out = str(tmp_path / "replay.jsonl")
    assert (
        stream_main(
            [
                str(tmp_path / "budget.yaml"),
                "--rank",
                "0",
                "--max-tokens",
                str(BUDGET),
                "--batch-size",
                str(ROWS),
                "--max-seq-len",
                str(CAP),
                "--batches",
                "6",
                "--output",
                out,
            ]
        )
        == 0
    )
    lines = [json.loads(x) for x in open(out)]
    assert len(lines) == 6
    for rec in lines:
        rows, t = rec["shape"]
        assert rows * t <= BUDGET and len(rec["samples"]) == rows
    assert os.path.getsize(out) > 0


def test_token_stream_yields_the_loaders_budget_batches(data, tmp_path):
    pytest.importorskip("torch")
    from wds_tools.torch_loader import TokenStream

    cfg = config(data, tmp_path)
    kw = dict(rank=0, world_size=1, batch_size=ROWS, num_workers=0, max_seq_len=CAP, max_tokens=BUDGET)
    ds = TokenStream(cfg, **kw)
    want = take(build_loader(cfg, output="numpy", transfer_batches=1, **kw), 8)
    got = [b for _, b in zip(range(8), ds)]
    for a, b in zip(want, got):
        _same(a, b)
    assert ds.state_dict()["layout"]["max_tokens"] == BUDGET
