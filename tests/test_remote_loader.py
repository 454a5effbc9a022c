"""The same data config read from disk, HTTP (nginx) and S3 (moto) yields identical batches,
also through connection cuts and through DataLoader worker processes."""

from __future__ import annotations

import pytest

from wds_tools import io as wio

from servers import BUCKET, FaultProxy, two_dataset_config

pytestmark = pytest.mark.network
torch = pytest.importorskip("torch")
loader_mod = pytest.importorskip("wds_tools.loader")

FAST = wio.IOOptions(timeout=2.0, connect_timeout=2.0, backoff=0.01, max_backoff=0.05)


def _config(tmp_path, name: str, base: str) -> str:
    return two_dataset_config(tmp_path, name, base, seed=7, weights=(0.7, 0.3))


def _batches(cfg_path, num_workers=0, opts=FAST):
    loader = loader_mod.build_loader(
        cfg_path,
        rank=0,
        world_size=1,
        batch_size=8,
        num_workers=num_workers,
        max_seq_len=256,
        pad_id=0,
        io_options=opts,
    )
    out = [(b["__key__"], b["dataset"], b["input_ids"].clone(), b["labels"].clone()) for b in loader]
    assert out, "no batches"
    return out


def _same(x, y) -> bool:
    return len(x) == len(y) and all(
        a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])
        for a, b in zip(x, y)
    )


@pytest.fixture(scope="module")
def disk_batches(remote_dataset, tmp_path_factory):
    return _batches(_config(tmp_path_factory.mktemp("cfg"), "disk", remote_dataset))


def test_same_config_from_disk_http_s3(remote_dataset, nginx, s3_env, tmp_path, disk_batches):
    keys = [k for b in disk_batches for k in b[0]]
    assert len(keys) == len(set(keys)) and {k[0] for k in keys} == {"s", "t"}
    assert _same(_batches(_config(tmp_path, "http", nginx.url)), disk_batches)
    assert _same(_batches(_config(tmp_path, "s3", f"s3://{BUCKET}")), disk_batches)


def test_loader_through_cut_connections(nginx, tmp_path, disk_batches):
    with FaultProxy(nginx.port, after_bytes=50_000, faults=5) as proxy:
        assert _same(_batches(_config(tmp_path, "proxy", proxy.url)), disk_batches)
        assert proxy.faults_done == 5


@pytest.mark.slow  # DataLoader workers
def test_s3_in_worker_processes(s3_env, tmp_path, remote_dataset):
    """The parent opens S3 first (manifests); forked workers must make their own clients."""
    cfg_s3 = _config(tmp_path, "s3", f"s3://{BUCKET}")
    cfg_disk = _config(tmp_path, "disk", remote_dataset)
    assert _same(_batches(cfg_s3, num_workers=2), _batches(cfg_disk, num_workers=2))


def test_remote_reads_stay_block_sized_ranges_read_once(remote_dataset, tmp_path):
    """With 12 canonical partitions over 3 ranks, a whole epoch over HTTP: every data read is a
    ranged GET of at most one block (16 samples) and no byte of a shard is fetched twice, about
    one request per 8 samples or better: partitions do not multiply the reads."""
    import os
    import re

    import yaml

    from wds_tools.reader import Shard

    from servers import DATASET_NAME, ScriptedHTTPServer

    biggest = 0  # the largest sample of either dataset, in bytes
    for name in (DATASET_NAME, DATASET_NAME + "2"):
        folder = os.path.join(remote_dataset, name)
        for f in os.listdir(folder):
            if f.endswith(".tar"):
                sh = Shard.open(os.path.join(folder, f))
                biggest = max(biggest, int(max(sh.lengths)))
    with ScriptedHTTPServer(remote_dataset) as srv:
        cfg = str(tmp_path / "count.yaml")
        with open(cfg, "w") as f:
            yaml.safe_dump(
                {
                    "seed": 3,
                    "partitions": 12,
                    "shuffle": {"block_size": 16, "window_blocks": 2},
                    "datasets": [
                        {"name": "a", "manifest": f"{srv.url}/{DATASET_NAME}/index.json", "max_epochs": 1},
                        {"name": "b", "manifest": f"{srv.url}/{DATASET_NAME}2/index.json", "max_epochs": 1},
                    ],
                },
                f,
            )
        loaders = [
            loader_mod.build_loader(cfg, rank=r, world_size=3, batch_size=4, output="numpy", io_options=FAST)
            for r in range(3)
        ]
        keys = [k for lo in loaders for b in lo for k in b["__key__"]]
        requests = list(srv.requests)
    assert len(keys) == len(set(keys)) == 600  # 2 x 300, 300 % 12 == 0: the whole epoch
    data = [(path, rng) for method, path, rng in requests if method == "GET" and path.endswith(".tar")]
    assert data and all(rng is not None for _, rng in data)  # ranged reads only, never a whole shard
    spans: dict = {}
    for path, rng in data:
        a, b = map(int, re.fullmatch(r"bytes=(\d+)-(\d+)", rng).groups())
        assert b - a + 1 <= 16 * (biggest + 1024)  # one block: 16 samples and their tar headers
        spans.setdefault(path, []).append((a, b))
    for path, ranges in spans.items():  # no byte fetched twice
        ranges.sort()
        assert all(x[1] < y[0] for x, y in zip(ranges, ranges[1:])), path
    print(f"{len(data)} ranged reads for {len(keys)} samples")
    assert len(data) <= len(keys) / 8, (len(data), len(keys))
