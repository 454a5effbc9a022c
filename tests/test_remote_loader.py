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
