"""The loader in other people's loops: ``TokenStream`` through a ``torch.utils.data.DataLoader``
the test builds itself (training a small model from it), per-sample mode, resume; and the
front's conveniences (a manifest as the config, overrides, lengths, the config's cache)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from wds_tools.config import load_data_config, parse_bytes, resolve_data_config
from wds_tools.loader import build_loader
from wds_tools.merge import merge
from wds_tools.reader import iter_samples
from wds_tools.stream import NumpyBackend, build_stream
from wds_tools.torch_loader import TokenStream
from wds_tools.writer import ShardWriter

from loader_fixtures import make_dataset, write_config

SMALL_VOCAB = 64


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("tl"))
    a = make_dataset(root, "a", 0, 200, samples_per_shard=50)
    b = make_dataset(root, "b", 1, 90, samples_per_shard=30)
    return write_config(
        os.path.join(root, "mix.yaml"), [{"manifest": a, "weight": 2}, {"manifest": b, "weight": 1}]
    )


@pytest.fixture(scope="module")
def counting(tmp_path_factory):
    """Learnable data: every sample counts up (mod 64) from a random start, 4 shards."""
    out = str(tmp_path_factory.mktemp("count") / "count")
    rng = np.random.default_rng(0)
    for rank in range(4):
        with ShardWriter(out, vocab_size=SMALL_VOCAB, rank=rank, world_size=4) as w:
            for i in range(60):
                n = int(rng.integers(8, 40))
                ids = (int(rng.integers(0, SMALL_VOCAB)) + np.arange(n)) % SMALL_VOCAB
                w.write(f"c{rank}-{i:04d}", ids.astype(np.uint8), labels=ids)
    merge(out)
    return os.path.join(out, "index.json")


class _TinyLM(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(SMALL_VOCAB, 16)
        self.out = torch.nn.Linear(16, SMALL_VOCAB)

    def forward(self, input_ids, labels):
        logits = self.out(self.emb(input_ids))[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, SMALL_VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100
        )


@pytest.mark.slow
def test_trains_through_a_plain_dataloader_with_workers(counting):
    """DataLoader(TokenStream(..., num_workers=2), batch_size=None, num_workers=2): each worker
    builds every second micro-batch whole (the stream's ``whole_batches`` mode, replayed here in
    one process), and a model learns from them."""
    ds = TokenStream(counting, batch_size=4, num_workers=2, max_seq_len=32)
    dl = DataLoader(ds, batch_size=None, num_workers=2)
    ours = iter(
        build_stream(
            counting,
            batch_size=4,
            num_workers=2,
            max_seq_len=32,
            transfer_batches=1,
            whole_batches=True,
            backend=NumpyBackend(simulate_workers=True),
        )
    )
    torch.manual_seed(0)
    model = _TinyLM()
    opt = torch.optim.Adam(model.parameters(), lr=5e-2)
    losses = []
    for step, batch in enumerate(dl):
        ref = next(ours)
        assert batch["__key__"] == ref["__key__"] and batch["dataset"] == ref["dataset"]
        for f in ("input_ids", "labels", "attention_mask", "lengths"):
            assert np.array_equal(batch[f].numpy(), ref[f]), f
        loss = model(batch["input_ids"], batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 39:
            break
    # from about ln(64) = 4.2 to well under 1: the model learnt to count from these batches
    assert len(losses) == 40 and np.mean(losses[:3]) > 3.5 and np.mean(losses[-5:]) < 1.0


def test_a_layout_mismatch_is_one_clear_error(cfg):
    ds = TokenStream(cfg, batch_size=4, num_workers=2)
    with pytest.raises(ValueError, match=r"num_workers=2 .* num_workers=0"):
        next(iter(DataLoader(ds, batch_size=None, num_workers=0)))


def _pad(samples):
    n = max(len(s["input_ids"]) for s in samples)
    ids = torch.zeros(len(samples), n, dtype=torch.int64)
    labels = torch.full((len(samples), n), -100, dtype=torch.int64)
    for i, s in enumerate(samples):
        ids[i, : len(s["input_ids"])] = s["input_ids"]
        labels[i, : len(s["labels"])] = s["labels"]
    return {"input_ids": ids, "labels": labels, "__key__": [s["__key__"] for s in samples]}


def test_per_sample_mode_with_a_user_collate(cfg):
    """batch_size=None: samples in the mixed order, labels rebuilt exactly; the user batches."""
    truth = {}
    for d in load_data_config(cfg).datasets:
        for s in iter_samples(d.manifest):
            truth[s["__key__"]] = s["labels"]
    ds = TokenStream(cfg, batch_size=None, max_seq_len=1 << 20)
    keys = []
    for batch in DataLoader(ds, batch_size=5, collate_fn=_pad):
        for k, lab in zip(batch["__key__"], batch["labels"]):
            assert lab[: len(truth[k])].tolist() == truth[k].tolist()
        keys += batch["__key__"]
        if len(keys) >= 100:
            break
    ours = iter(build_loader(cfg, batch_size=1, max_seq_len=1 << 20, output="numpy"))
    assert keys == [next(ours)["__key__"][0] for _ in keys]  # the loader's stream, one by one


def test_state_dict_resumes_exactly_without_workers(cfg):
    ds = TokenStream(cfg, batch_size=3, max_seq_len=32)
    it = iter(DataLoader(ds, batch_size=None))
    for _ in range(7):
        next(it)
    sd = ds.state_dict()
    rest = [next(it)["__key__"] for _ in range(5)]
    again = TokenStream(cfg, batch_size=3, max_seq_len=32)
    again.load_state_dict(sd)
    assert [b["__key__"] for _, b in zip(range(5), DataLoader(again, batch_size=None))] == rest
    other = TokenStream(cfg, batch_size=4, max_seq_len=32)
    with pytest.raises(ValueError, match="same settings"):
        other.load_state_dict(sd)


# --- the front's conveniences ----------------------------------------------------------------


def test_a_manifest_works_where_a_config_is_expected(cfg):
    man = load_data_config(cfg).datasets[0].manifest
    loader = build_loader(man, batch_size=8, shuffle=False, max_epochs=1, output="numpy")
    keys = [k for b in loader for k in b["__key__"]]
    assert keys == [s["__key__"] for s in iter_samples(man)][: len(keys)]
    assert len(keys) == 200 and len(loader) == 25
    b = next(iter(build_loader(man, batch_size=8, output="numpy")))
    assert (
        isinstance(b["input_ids"], np.ndarray)
        and b["lengths"].tolist() == b["attention_mask"].sum(axis=1).tolist()
    )


def test_arguments_override_the_config(cfg):
    base = load_data_config(cfg)
    c = resolve_data_config(cfg, shuffle=False, max_epochs=2, seed=5, weight_by="tokens")
    assert (c.seed, c.weight_by, c.shuffle.shards, c.shuffle.samples) == (5, "tokens", False, False)
    assert all(d.max_epochs == 2 for d in c.datasets) and c.bounded and not base.bounded
    with pytest.raises(ValueError, match="max_epochs: must be an integer >= 1"):
        resolve_data_config(cfg, max_epochs=0)


def test_cache_in_the_data_config(tmp_path, cfg):
    d = load_data_config(cfg).datasets[0]
    path = write_config(
        str(tmp_path / "c.yaml"), [{"manifest": d.manifest}], cache={"dir": "shard-cache", "max_bytes": "2G"}
    )
    c = load_data_config(path)
    assert c.cache.dir == str(tmp_path / "shard-cache") and c.cache.max_bytes == 2 << 30
    from wds_tools import io as wio

    opts = c.io_options(wio.DEFAULT)
    assert opts.cache_dir == c.cache.dir and opts.cache_max_bytes == 2 << 30
    flag = wio.IOOptions(cache_dir=str(tmp_path / "flag"))
    assert c.io_options(flag).cache_dir == str(tmp_path / "flag")  # the command line wins
    for bad, msg in (
        ({"max_bytes": 5}, r"cache\.dir: required"),
        ({"dir": "x", "max_bytes": "lots"}, "not a byte count"),
        ({"dir": "x", "size": 1}, "unknown key 'size'"),
    ):
        p = write_config(str(tmp_path / "bad.yaml"), [{"manifest": d.manifest}], cache=bad)
        with pytest.raises(ValueError, match=msg):
            load_data_config(p)
    assert parse_bytes("1.5T", "x") == int(1.5 * (1 << 40)) and parse_bytes(4096, "x") == 4096
