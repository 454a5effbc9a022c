"""Data config validation, epoch slices (disjoint, complete, sequential) and the mixer's
per-prefix guarantee, without reading shards (plans are built from counts)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wds_tools.config import DatasetConfig, ShuffleConfig, parse_data_config
from wds_tools.mixing import DatasetPlan, EpochSlice, Mixer


def plan_of(counts, index=0, name="d"):
    counts = np.asarray(counts, dtype=np.int64)
    return DatasetPlan(
        index=index,
        config=DatasetConfig(name=name, manifest=f"/x/{name}.json"),
        urls=[f"s{i}" for i in range(len(counts))],
        index_urls=[f"i{i}" for i in range(len(counts))],
        shard_samples=counts,
        shard_tokens=counts * 10,
        num_samples=int(counts.sum()),
        num_tokens=int(counts.sum() * 10),
    )


# --- config -------------------------------------------------------------------------------


def test_native_config_parses_with_defaults_and_relative_paths(tmp_path):
    cfg = parse_data_config(
        {
            "seed": 5,
            "weight_by": "tokens",
            "datasets": [
                {"manifest": "a/index.json", "weight": 3, "max_epochs": 2},
                {"name": "web", "manifest": "s3://bucket/web/index.json", "weight": 1, "group": "img"},
            ],
        },
        where="cfg.yaml",
        base_dir=str(tmp_path),
    )
    a, b = cfg.datasets
    assert a.name == "a" and a.manifest == str(tmp_path / "a" / "index.json") and a.max_epochs == 2
    assert b.manifest == "s3://bucket/web/index.json" and b.group == "img"
    assert cfg.seed == 5 and cfg.weight_by == "tokens" and cfg.groups == ["default", "img"]
    assert not cfg.bounded and cfg.shuffle == ShuffleConfig()


def test_reference_meta_form_means_ratio_times_size_and_type_groups():
    cfg = parse_data_config(
        {
            "META": [
                {"path": "/d/a/index.json", "type": "t2i", "ratio": 0.4},
                {"path": "/d/b/index.json", "type": "chat", "ratio": 1},
            ]
        }
    )
    assert [d.ratio for d in cfg.datasets] == [0.4, 1.0]
    assert [d.group for d in cfg.datasets] == ["t2i", "chat"]
    from wds_tools.mixing import dataset_weights

    plans = [plan_of([1000]), plan_of([100], index=1, name="b")]
    plans[0].config, plans[1].config = cfg.datasets
    assert dataset_weights(cfg, plans).tolist() == pytest.approx([400 / 500, 100 / 500])


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"datasets": [{"manifest": "a.json", "weight": -1}]}, ["datasets[0]", "weight"]),
        ({"datasets": [{"weight": 1}]}, ["datasets[0]", "manifest"]),
        ({"datasets": [{"manifest": "a.json", "wieght": 1}]}, ["datasets[0]", "wieght"]),
        (
            {"datasets": [{"name": "x", "manifest": "a.json"}, {"name": "x", "manifest": "b.json"}]},
            ["datasets[1]", "name", "'x'"],
        ),
        (
            {"datasets": [{"name": "n", "manifest": "a.json", "max_epochs": 0}]},
            ["datasets[0] ('n')", "max_epochs"],
        ),
        ({"datasets": [{"manifest": "a.json", "weight_by": "tokens"}]}, ["datasets[0]", "weight_by"]),
        ({"META": [{"path": "a.json", "ratio": "lots"}]}, ["META[0]", "ratio"]),
        ({"META": [{"path": "a.json"}], "datasets": []}, ["either"]),
        ({"datasets": [{"manifest": "a.json"}], "on_error": "ignore"}, ["on_error"]),
        ({"datasets": [{"manifest": "a.json"}], "shuffle": {"block_size": 0}}, ["block_size"]),
        ({"datasets": [{"manifest": "pipe:curl x"}]}, ["pipe:"]),
        ({"datasets": []}, ["datasets"]),
    ],
)
def test_config_errors_name_the_entry_and_key(doc, words):
    with pytest.raises(ValueError) as e:
        parse_data_config(doc, where="data.yaml")
    for w in words:
        assert w in str(e.value)


# --- epoch slices --------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    counts=st.lists(st.integers(0, 60), min_size=1, max_size=12),
    consumers=st.integers(1, 6),
    block=st.integers(1, 9),
    window=st.integers(1, 4),
    epoch=st.integers(0, 3),
)
def test_epoch_slices_are_equal_disjoint_and_drop_only_the_remainder(counts, consumers, block, window, epoch):
    plan = plan_of(counts)
    n = plan.num_samples
    if n < consumers:
        return
    sh = ShuffleConfig(block_size=block, window_blocks=window)
    slices = [EpochSlice(plan, sh, 7, epoch, c, consumers).samples() for c in range(consumers)]
    assert {len(s) for s in slices} == {n // consumers}
    seen = [x for s in slices for x in s]
    assert len(set(seen)) == len(seen)  # nothing read twice in an epoch
    every = {(s, i) for s, c in enumerate(counts) for i in range(c)}
    assert set(seen) <= every and len(every - set(seen)) == n % consumers


def test_blocks_are_sequential_runs_inside_one_shard():
    plan = plan_of([100, 37, 250])
    sl = EpochSlice(plan, ShuffleConfig(block_size=16, window_blocks=4), 1, 0, 0, 1)
    assert (sl.block_len <= 16).all() and sl.block_len.sum() == 387
    assert ((sl.block_start + sl.block_len) <= plan.shard_samples[sl.block_shard]).all()


def test_order_changes_with_epoch_seed_and_consumer_and_is_reproducible():
    plan = plan_of([50] * 8)
    sh = ShuffleConfig(block_size=8, window_blocks=4)

    def order(seed, epoch, c, n=2):
        return EpochSlice(plan, sh, seed, epoch, c, n).samples()

    assert order(1, 0, 0) == order(1, 0, 0)
    assert order(1, 0, 0) != order(1, 1, 0) != order(2, 0, 0)
    first_shards = [EpochSlice(plan, sh, 1, e, 0, 1).block_shard[0] for e in range(6)]
    assert len(set(first_shards)) > 1  # shard order changes between epochs
    assert order(1, 0, 0)[:50] != order(1, 0, 1)[:50]
    unshuffled = EpochSlice(plan, ShuffleConfig(shards=False, samples=False), 1, 0, 0, 1).samples()
    assert unshuffled == [(s, i) for s in range(8) for i in range(50)]


# --- mixer ---------------------------------------------------------------------------------


def test_every_prefix_is_within_one_sample_of_the_weights():
    w = [0.7, 0.2, 0.1]
    m = Mixer(w, [0, 0, 0], [None] * 3)
    for n in range(1, 5001):
        m.account(m.choose(0), 1)
        for i in range(3):
            assert abs(m.samples[i] - w[i] * n) < 1.0 + 1e-9


def test_token_weighting_keeps_token_shares_within_one_sample():
    rng = np.random.default_rng(0)
    w = [0.5, 0.3, 0.2]
    mean = [100, 2000, 400]  # very different sample lengths
    m = Mixer(w, [0, 0, 0], [None] * 3)
    longest = 0
    for _ in range(5000):
        d = m.choose(0)
        n = int(rng.integers(1, 2 * mean[d]))
        longest = max(longest, n)
        m.account(d, n)
        total = sum(m.units)
        for i in range(3):
            assert abs(m.units[i] - w[i] * total) <= longest


def test_groups_take_whole_batches_and_capped_datasets_leave():
    m = Mixer([0.5, 0.25, 0.25], [0, 1, 1], [None, 12, None], min_left=4)
    picks = []
    for _ in range(40):
        g = m.choose_group()
        ds = set()
        for _ in range(4):
            d = m.choose(g)
            m.account(d, 1)
            ds.add(d)
        picks.append(g)
        assert {m.group_of[d] for d in ds} == {g}
    assert m.samples[1] == 12  # capped at 12, then only dataset 2 fills group 1
    assert abs(picks[:12].count(0) - 6) <= 1  # 0.5 : 0.5 while all datasets are active
    # after the cap, group 1 weighs only 0.25 against 0.5: group 0 takes 2/3 of the batches
    assert abs(picks[20:].count(0) - 20 * 2 / 3) <= 1.5


def test_bounded_mixer_ends_when_every_group_is_short_of_a_batch():
    m = Mixer([0.5, 0.5], [0, 0], [10, 7], min_left=4)
    batches = 0
    while m.choose_group() >= 0:
        for _ in range(4):
            m.account(m.choose(0), 1)
        batches += 1
    assert batches == 17 // 4 and m.samples == [m.samples[0], m.samples[1]]
    assert sum(m.samples) == 16 and m.samples[0] <= 10 and m.samples[1] <= 7
