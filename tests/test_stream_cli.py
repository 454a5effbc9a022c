"""``wds-tools stream`` and ``wds-tools mix``: help, replay, save/resume across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from loader_fixtures import make_dataset, write_config


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("stream_cli"))
    a = make_dataset(root, "a", 0, 500, shard_sizes=[200, 13, 287])
    b = make_dataset(root, "b", 1, 120, samples_per_shard=30)
    c = make_dataset(root, "c", 2, 25, samples_per_shard=5)
    return write_config(
        os.path.join(root, "data.yaml"),
        [{"manifest": a, "weight": 0.7}, {"manifest": b, "weight": 0.2}, {"manifest": c, "weight": 0.1}],
        seed=11,
        shuffle={"block_size": 16, "window_blocks": 2},
    )


def cli(*args):
    r = subprocess.run(
        [sys.executable, "-m", "wds_tools.cli", *args], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize(
    "sub, flags",
    [
        (
            "stream",
            [
                "--rank",
                "--world-size",
                "--num-workers",
                "--batch-size",
                "--batches",
                "--steps",
                "--grad-accum",
                "--save-state",
                "--resume-state",
                "--from-step",
            ],
        ),
        ("mix", ["--samples", "--steps", "--json", "--batch-size", "--world-size", "--grad-accum", "--plot"]),
    ],
)
def test_help_lists_every_flag(sub, flags):
    out = cli(sub, "--help")
    for f in flags:
        assert f in out


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["0", "2"])
def test_stream_resume_in_new_processes_equals_uninterrupted(cfg, tmp_path, workers):
    common = [
        "stream",
        cfg,
        "--rank",
        "1",
        "--world-size",
        "2",
        "--num-workers",
        workers,
        "--batch-size",
        "4",
        "--max-seq-len",
        "40",
    ]
    full = cli(*common, "--batches", "12").splitlines()
    state = str(tmp_path / "state.json")
    head = cli(*common, "--batches", "5", "--save-state", state).splitlines()
    tail = cli(*common, "--batches", "7", "--resume-state", state).splitlines()
    assert head + tail == full
    recs = [json.loads(x) for x in full]
    assert [r["step"] for r in recs] == list(range(12)) and {r["rank"] for r in recs} == {1}
    s = recs[0]["samples"][0]
    assert set(s) == {"dataset", "key", "tokens"} and s["key"].startswith(s["dataset"] + "-")
    # --from-step prints the same records as the full replay
    assert cli(*common, "--from-step", "9", "--batches", "3").splitlines() == full[9:]
    # another rank sees other samples
    other = cli(*common[:3], "0", *common[4:], "--batches", "12")
    keys = lambda lines: {s["key"] for x in lines for s in json.loads(x)["samples"]}  # noqa: E731
    assert not keys(full) & keys(other.splitlines())


def _run(cfg, *flags):
    return [json.loads(x) for x in cli("stream", cfg, "--max-seq-len", "40", *flags).splitlines()]


def _global(recs):
    """step -> the global batch: sorted (dataset, key, epoch) over every rank and micro-batch."""
    out = {}
    for r in recs:
        out.setdefault(r["step"], []).extend((s["dataset"], s["key"], s["epoch"]) for s in r["samples"])
    return {k: sorted(v) for k, v in out.items()}


@pytest.mark.slow  # several CLI processes
def test_whole_run_resumes_under_other_layouts(cfg, tmp_path):
    first = ["--world-size", "2", "--num-workers", "2", "--batch-size", "6"]  # global batch 12
    full = _run(cfg, *first, "--steps", "12")
    assert [(r["step"], r["rank"], r["micro"]) for r in full[:3]] == [(0, 0, 0), (0, 1, 0), (1, 0, 0)]
    state = str(tmp_path / "run.json")
    head = _run(cfg, *first, "--steps", "5", "--save-state", state)
    assert head == full[:10]
    fg = _global(full)
    # the same global batch under another world size, workers, micro-batch, accumulation:
    # every global batch holds exactly the samples of the uninterrupted run's
    for layout in (
        ["--world-size", "3", "--num-workers", "1", "--batch-size", "4"],
        ["--world-size", "4", "--num-workers", "3", "--batch-size", "3"],
        ["--world-size", "1", "--batch-size", "6", "--grad-accum", "2"],
    ):
        tail = _run(cfg, *layout, "--steps", "7", "--resume-state", state)
        assert _global(tail) == {s: fg[s] for s in range(5, 12)}, layout
    # another global batch (8): the canonical stream goes on; 5 x 12 + 9 x 8 samples are the
    # uninterrupted run's first 11 x 12, nothing repeated, nothing skipped
    tail = _run(
        cfg,
        "--world-size",
        "2",
        "--num-workers",
        "2",
        "--batch-size",
        "4",
        "--steps",
        "9",
        "--resume-state",
        state,
    )
    assert {r["step"] for r in tail} == set(range(5, 14))
    got = [x for s in range(5) for x in fg[s]] + [x for v in _global(tail).values() for x in v]
    assert len(got) == len(set(got)) == 132
    assert sorted(got) == sorted(x for s in range(11) for x in fg[s])


def test_stream_refuses_a_world_size_that_does_not_divide_the_partitions(cfg, tmp_path):
    state = str(tmp_path / "s.json")
    cli("stream", cfg, "--steps", "1", "--world-size", "2", "--save-state", state)
    assert json.load(open(state))["partitions"] == 12
    r = subprocess.run(
        [sys.executable, "-m", "wds_tools.cli", "stream", cfg, "--world-size", "5", "--resume-state", state],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "does not divide the run's 12 partitions" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_mix_dry_run_reports_shares_epochs_and_wraps(cfg):
    rep = json.loads(cli("mix", cfg, "--samples", "2000", "--batch-size", "8", "--json"))
    assert rep["simulated_samples"] == 2000 and not rep["ended"]
    by = {d["name"]: d for d in rep["datasets"]}
    K = rep["partitions"]
    for name, w in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        d = by[name]
        assert d["target_share"] == pytest.approx(w)
        # every partition is within a sample of the weights; the run interleaves K of them
        assert abs(d["sample_share"] - w) < 0.002 and d["max_deviation"] <= 4.0
        assert 0 < d["token_share"] < 1
    per_epoch = K * (25 // K)  # "c": 25 samples over K partitions, the remainder left out
    assert by["c"]["epochs_consumed"] == pytest.approx(by["c"]["samples"] / per_epoch)
    assert by["c"]["steps_per_epoch"] == pytest.approx(per_epoch / (by["c"]["sample_share"] * 8))
    table = cli("mix", cfg, "--samples", "500")
    assert "steps to wrap" in table and "a" in table
