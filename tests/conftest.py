"""Shared pytest fixtures: local servers with the remote test datasets (nginx, moto S3) and the
tiny offline Lumina artifacts. Plain helpers (server classes, dataset builders) live in
``servers.py``, ``loader_fixtures.py`` and ``lumina_fixtures.py``."""

from __future__ import annotations

import os

import pytest

from lumina_fixtures import build_tiny_dirs
from servers import BUCKET, DATASET_NAME, MotoS3Server, NginxServer, find_nginx, make_dataset

# --- servers with the remote test datasets -----------------------------------------


@pytest.fixture(scope="session")
def remote_dataset(tmp_path_factory) -> str:
    """Folder ``.../www`` holding two dataset folders, ``ds/`` and ``ds2/`` (3 shards, 300
    samples each, equal shard file names, different content)."""
    www = tmp_path_factory.mktemp("www")
    make_dataset(str(www / DATASET_NAME))
    make_dataset(str(www / (DATASET_NAME + "2")), seed=1, key_prefix="t")
    return str(www)


@pytest.fixture(scope="session")
def nginx(remote_dataset):
    """A running :class:`NginxServer` whose root holds ``ds/`` (skips without nginx)."""
    if find_nginx() is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx; CI installs it)")
    with NginxServer(remote_dataset) as srv:
        yield srv


@pytest.fixture(scope="session")
def s3(remote_dataset):
    """A running :class:`MotoS3Server` with ``ds/`` and ``ds2/`` uploaded to
    ``s3://wds-test/``."""
    pytest.importorskip("boto3")
    pytest.importorskip(
        "moto.server", reason="moto[server] is not installed (pip install 'moto[server]'; CI installs it)"
    )
    with MotoS3Server() as srv:
        for name in (DATASET_NAME, DATASET_NAME + "2"):
            srv.upload_folder(os.path.join(remote_dataset, name), BUCKET, name)
        srv.bucket = BUCKET
        yield srv


@pytest.fixture
def s3_env(s3, monkeypatch):
    """The standard AWS environment pointing at the moto server, for one test."""
    for k in (
        "AWS_PROFILE",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_ENDPOINT_URL_S3",
        "AWS_REGION",
    ):
        monkeypatch.delenv(k, raising=False)
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    from wds_tools import io as wio

    wio.reset_clients()  # clients cache the environment they were made in
    yield s3
    wio.reset_clients()


@pytest.fixture(scope="session")
def tiny_dirs() -> tuple[str, str]:
    return build_tiny_dirs()
