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
                "--save-state",
                "--resume-state",
                "--from-step",
            ],
        ),
        ("mix", ["--samples", "--json", "--batch-size", "--world-size"]),
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


def test_stream_refuses_a_state_of_another_layout(cfg, tmp_path):
    state = str(tmp_path / "s.json")
    cli("stream", cfg, "--batches", "1", "--world-size", "2", "--save-state", state)
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "wds_tools.cli",
            "stream",
            cfg,
            "--batches",
            "1",
            "--world-size",
            "4",
            "--resume-state",
            state,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "world_size" in r.stderr and "Traceback" not in r.stderr


def test_mix_dry_run_reports_shares_epochs_and_wraps(cfg):
    rep = json.loads(cli("mix", cfg, "--samples", "2000", "--batch-size", "8", "--json"))
    assert rep["simulated_samples"] == 2000 and not rep["ended"]
    by = {d["name"]: d for d in rep["datasets"]}
    for name, w in (("a", 0.7), ("b", 0.2), ("c", 0.1)):
        d = by[name]
        assert d["target_share"] == pytest.approx(w)
        assert abs(d["sample_share"] - w) < 0.002 and d["max_deviation"] < 1.0
        assert 0 < d["token_share"] < 1
    assert by["c"]["epochs_consumed"] == pytest.approx(200 / 25)
    assert by["c"]["steps_per_epoch"] == pytest.approx(25 / (0.1 * 8))
    table = cli("mix", cfg, "--samples", "500")
    assert "steps to wrap" in table and "a" in table
