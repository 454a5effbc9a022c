"""Smoke runs of the benchmarks at tiny size (they are not tests of speed)."""

from __future__ import annotations

import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCH)


def test_bench_reader_smoke(tmp_path, capsys):
    import bench_reader

    docs = tmp_path / "b.md"
    assert (
        bench_reader.main(["--samples", "300", "--tokens", "100", "--repeat", "1", "--docs", str(docs)]) == 0
    )
    out = capsys.readouterr().out
    assert "plain webdataset" in out and "iter_samples" in out and "limit" in out
    text = docs.read_text()
    assert "<!-- bench_reader:begin -->" in text and "samples/s" in text
    bench_reader.main(["--samples", "300", "--tokens", "100", "--repeat", "1", "--docs", str(docs)])
    assert docs.read_text().count("<!-- bench_reader:begin -->") == 1  # replaced, not appended


@pytest.mark.network
@pytest.mark.slow
def test_bench_stream_smoke(capsys):
    import bench_stream

    from servers import find_nginx

    if find_nginx() is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx; CI installs it)")
    pytest.importorskip("moto.server")
    assert (
        bench_stream.main(
            ["--samples", "600", "--tokens", "100", "--repeat", "1", "--big-shards", "20", "--no-docs"]
        )
        == 0
    )
    out = capsys.readouterr().out
    for row in ("disk", "nginx", "moto S3", "curl", "DataLoader 2 workers", "time to first batch"):
        assert row in out


@pytest.mark.network
@pytest.mark.slow
def test_bench_s3_transport_smoke(tmp_path, capsys):
    import shutil

    import bench_s3_transport

    pytest.importorskip("moto.server")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed (CI installs it)")
    docs = tmp_path / "b.md"
    env_before = dict(os.environ)
    assert (
        bench_s3_transport.main(["--sizes", "1,2", "--total", "4", "--repeat", "1", "--docs", str(docs)]) == 0
    )
    assert dict(os.environ) == env_before  # moto's endpoint does not outlive the benchmark
    out = capsys.readouterr().out
    assert "| 1 MB x 4 |" in out and "| 2 MB x 2 |" in out and "wds_tools / curl" in out
    assert docs.read_text().count("<!-- bench_s3_transport:begin -->") == 1
