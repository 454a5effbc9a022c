"""``wds-tools view``: routes, figures, search, escaping, path traversal, laziness, remote
sources and the command line (the browser test is ``test_view_browser.py``)."""

from __future__ import annotations

import http.client
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from typing import Optional

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "benchmarks"))
from wds_tools.reader import Shard, load_manifest  # noqa: E402
from wds_tools.view import charts  # noqa: E402
from wds_tools.view.data import open_dataset, open_source  # noqa: E402
from wds_tools.view.server import App, Viewer, load_renderer  # noqa: E402

from servers import BUCKET  # noqa: E402
from view_fixtures import NUM_SAMPLES, GrayRenderer, build_tokenizer, make_view_dataset  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewdata")
    tok = build_tokenizer(str(root / "tok"))
    manifest = make_view_dataset(str(root), tok)
    return {"root": str(root), "tok": tok, "manifest": manifest}


@pytest.fixture
def app(data):
    return App(open_source(data["manifest"]), tokenizer=data["tok"], renderer=GrayRenderer(), page_size=5)


def get(app: App, target: str):
    r = app.handle("GET", target)
    return (
        r.status,
        r.body.decode("utf-8", "replace") if r.content_type.startswith(("text/", "image/svg")) else r.body,
        r,
    )


def http_get(url: str, target: str, host: Optional[str] = None, method: str = "GET"):
    """A request with ``target`` sent as-is (no client-side normalisation)."""
    u = url.rstrip("/").split("//", 1)[1]
    conn = http.client.HTTPConnection(u, timeout=10)
    conn.putrequest(method, target, skip_host=host is not None, skip_accept_encoding=True)
    if host is not None:
        conn.putheader("Host", host)
    conn.endheaders()
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r.status, body, dict(r.getheaders())


# --- pages ------------------------------------------------------------------------------------


def test_overview_counts_are_the_manifests(app, data):
    with open(data["manifest"]) as f:
        m = json.load(f)
    status, html, _ = get(app, "/")
    assert status == 200
    for label, value in (
        ("shards", "3"),
        ("samples", f"{NUM_SAMPLES}"),
        ("tokens", f"{m['num_tokens']:,}"),
        ("supervised tokens", f"{m['num_supervised'] / m['num_tokens']:.1%}"),
    ):
        assert f'<div class="v">{value}</div><div class="k">{label}</div>' in html
    assert "from all 3 shards (12 samples)" in html
    assert html.count('<svg class="chart"') == 4 and "<rect" in html
    ov = app.source.datasets[0].overview()
    assert ov.images_per_sample == {0: 4, 1: 8} and ov.grids == {"4x6": 4, "6x6": 4}
    lengths = [
        n
        for e in m["shards"]
        for n in Shard.open(os.path.join(os.path.dirname(data["manifest"]), e["path"])).num_tokens
    ]
    assert sorted(ov.lengths.tolist()) == sorted(lengths)


def test_sample_list_pages_across_shards(app):
    status, html, _ = get(app, "/d/0/samples?start=3")
    assert status == 200
    keys = [f"pics-{i:04d}" for i in range(3, 8)]  # shard 0 holds 0-4, shard 1 5-9
    assert all(f">{k}</a>" in html for k in keys) and ">pics-0008</a>" not in html
    assert "samples 4&ndash;8 of 12" in html
    assert 'href="/d/0/samples?start=8"' in html and 'href="/d/0/samples?start=10"' in html
    assert "item-003" in html and "conv.jsonl" in html and "4x6" in html


def test_sample_page_decoded_trained_special_images(app):
    status, html, _ = get(app, "/d/0/s/2")
    assert status == 200
    assert '<span class="t train" title="positions 63-73 (trained)">A red square number 2.' in html
    assert "User: What is in the picture 2?" in html
    assert '<span class="sp" title="id 0">&lt;s&gt;</span>' in html
    assert '<img src="/d/0/img/2/0.png"' in html and "grid 6x6" in html
    assert "crop box [8, 4, 104, 100] of the 224x208 original" in html
    assert 'href="/d/0/s/1"' in html and 'href="/d/0/s/3"' in html
    assert 'href="/d/0/raw/2"' in html and "raw ids and labels" in html


def test_image_route_renders_the_block(app):
    from PIL import Image

    status, png, r = get(app, "/d/0/img/2/0.png")
    assert status == 200 and r.content_type == "image/png"
    assert Image.open(io.BytesIO(png)).size == (96, 96)
    assert get(app, "/d/0/img/2/0.png")[1] == png and app.renderer.calls == 1  # cached
    assert get(app, "/d/0/img/2/1.png")[0] == 404  # sample 2 has one image
    assert get(app, "/d/0/img/0/0.png")[0] == 404  # sample 0 has none


def test_without_tokenizer_or_renderer(data):
    app = App(open_source(data["manifest"]))
    html = get(app, "/d/0/s/2")[1]
    assert '<span class="ids">' in html and "no --renderer" in html and "<img" not in html
    assert get(app, "/d/0/img/2/0.png")[0] == 404


def test_raw_bytes_are_the_samples_tar_members(app, data):
    status, body, r = get(app, "/d/0/raw/6")
    assert status == 200 and "pics-0006.tar" in r.headers["Content-Disposition"]
    m = load_manifest(data["manifest"])
    sh = Shard.open(m["shards"][1]["url"])
    with open(sh.url, "rb") as f:
        f.seek(sh.offsets[1])
        assert body == f.read(sh.lengths[1])
    with tarfile.open(fileobj=io.BytesIO(body)) as tf:
        names = tf.getnames()
    assert names == ["pics-0006.input_ids.npy", "pics-0006.json"]


def test_search_by_key_and_metadata(app):
    html = get(app, "/d/0/samples?q=pics-0002&field=key")[1]
    assert '<a href="/d/0/s/2">pics-0002</a>' in html and "1 match " in html
    html = get(app, "/d/0/samples?q=item-01&field=id")[1]
    assert all(f">pics-00{i}</a>" in html for i in ("10", "11")) and "2 matches" in html
    assert "whole dataset searched" in html
    html = get(app, "/d/0/samples?q=pwned&field=meta")[1]
    assert ">pics-0007</a>" in html and "1 match " in html
    assert ">pics-0007</a>" in get(app, "/d/0/samples?q=pwned&field=source")[1]
    assert get(app, "/d/0/samples?q=x&field=nope")[0] == 400


def test_search_is_bounded_and_resumable(app):
    d = app.source.datasets[0]
    res = d.search("pics", "key", 0, max_results=3)
    assert [r["g"] for r in res.rows] == [0, 1, 2] and res.stop == 3 and not res.complete
    res = d.search("pics", "key", res.stop, max_results=3)
    assert [r["g"] for r in res.rows] == [3, 4, 5]
    res = d.search("conv", "source", 0, budget_bytes=1)  # one sample per call at most
    assert [r["g"] for r in res.rows] == [0] and res.stop == 1
    html = get(app, "/d/0/samples?q=conv&field=source&from=11")[1]
    assert ">pics-0011</a>" in html and ">pics-0010</a>" not in html


def test_key_route_redirects(app):
    status, _, r = get(app, "/d/0/key/pics-0009")
    assert status == 302 and r.headers["Location"] == "/d/0/s/9"
    assert get(app, "/d/0/key/nope")[0] == 404


def test_data_strings_are_escaped(app):
    for target in (
        "/d/0/s/7",
        "/d/0/samples?start=5",
        "/d/0/samples?q=pwned&field=meta",
        "/d/0/samples?q=%3Cscript%3E&field=id",
    ):
        status, html, _ = get(app, target)
        assert status == 200
        assert "<script" not in html.lower(), target
        assert "&lt;script&gt;window.__pwned=1" in html, target
    # the query string itself is echoed escaped
    html = get(app, "/d/0/samples?q=%22%3E%3Cscript%3Ealert(1)%3C/script%3E&field=key")[1]
    assert "<script" not in html and 'value="&quot;&gt;&lt;script&gt;' in html


def test_charts_escape_labels_and_handle_empty():
    svg = charts.bars(["<b>x</b>"], [3], "t<i>", "x", "y")
    assert "<b>" not in svg and "&lt;b&gt;x&lt;/b&gt;" in svg and "t&lt;i&gt;" in svg
    assert "no data" in charts.histogram([], "t", "x")
    h = charts.histogram(np.array([5, 5, 6, 100]), "t", "x")
    assert h.count("<rect") == 2 and "<title>5-7: 3</title>" in h  # bins of 3 tokens


# --- security over HTTP -------------------------------------------------------------------------

BAD_TARGETS = [
    "/../etc/passwd",
    "/d/0/../../etc/passwd",
    "/%2e%2e/%2e%2e/etc/passwd",
    "/d/0/s/%2e%2e%2fx",
    "/d/0/%2e%2e/index.json",
    "//etc/passwd",
    "/etc/passwd",
    "/index.json",
    "/d/0/index.json",
    "/d/0/shard-r00000-000000.tar",
    "/d/0/secret.tar",
    "/d/0/raw/../../secret.tar",
    "/d/0/raw/12",
    "/d/0/s/999",
    "/d/1/",
    "/d/0/img/2/9.png",
    "/d/0/raw/-1",
    "/d/0/s/0x1",
    "/d/0/./s/1",
    "/d/0/s/1/",
    "/d/0/key/..%2fsecret",
    "/d/0/samples?start=-1",
    "/d/0/samples?start=abc",
    "http://evil.example/etc/passwd",
    "/d/0/raw/99999999999999999999",
]


def test_only_the_source_is_served(data, tmp_path):
    folder = os.path.dirname(data["manifest"])
    secret = b"TOP-SECRET-" * 10
    with open(os.path.join(folder, "secret.tar"), "wb") as f:  # beside the shards, not listed
        f.write(secret)
    try:
        with Viewer(App(open_source(data["manifest"]))) as v:
            for target in BAD_TARGETS:
                status, body, headers = http_get(v.url, target)
                assert 400 <= status < 500, (target, status)
                assert b"TOP-SECRET" not in body and b"root:" not in body
            status, body, headers = http_get(v.url, "/d/0/s/1")
            assert status == 200
            assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'none'
            assert "default-src 'none'" in headers["Content-Security-Policy"]
            assert headers["X-Content-Type-Options"] == "nosniff"
            assert http_get(v.url, "/", method="POST")[0] == 501
    finally:
        os.remove(os.path.join(folder, "secret.tar"))


def test_loopback_bind_and_host_check(data):
    with Viewer(App(open_source(data["manifest"]))) as v:
        host, port = v.server.server_address[:2]
        assert host == "127.0.0.1" and v.url == f"http://127.0.0.1:{port}/"
        assert http_get(v.url, "/", host=f"localhost:{port}")[0] == 200
        assert http_get(v.url, "/", host=f"attacker.example:{port}")[0] == 403  # DNS rebinding


# --- sources ----------------------------------------------------------------------------------


def test_single_shard_and_shard_index_sources(data):
    m = load_manifest(data["manifest"])
    for src in (m["shards"][1]["url"], m["shards"][1]["index_url"]):
        app = App(open_source(src))
        html = get(app, "/")[1]
        assert '<div class="v">1</div><div class="k">shards</div>' in html
        assert '<div class="v">5</div><div class="k">samples</div>' in html
        assert ">pics-0005<" in get(app, "/d/0/s/0")[1]
        # the other shards of the folder are not part of this source
        assert get(app, "/d/0/s/5")[0] == 404 and get(app, "/d/0/raw/5")[0] == 404
    folder = App(open_source(os.path.dirname(data["manifest"])))  # a folder: its index.json
    assert '<div class="v">12</div><div class="k">samples</div>' in get(folder, "/")[1]


def test_overview_reads_a_bounded_sample_of_shards(tmp_path):
    from bench_stream import write_big_manifest

    from servers import make_dataset

    folder = str(tmp_path / "big")
    make_dataset(folder, num_samples=40, max_samples=10)
    big = write_big_manifest(folder, 5000)  # 5,000 entries x 10 samples over 4 real shards
    d = open_dataset(big, stats_shards=8)
    assert d.index_reads == 0 and d.num_samples == 50_000
    app = App(open_source(big, stats_shards=8))
    d = app.source.datasets[0]
    html = get(app, "/")[1]
    assert d.index_reads == 8 and "from 8 of 5000 shards (80 samples" in html
    assert '<div class="v">50,000</div><div class="k">samples</div>' in html
    get(app, "/d/0/samples?start=31000")  # a page of 5 shards of 10 samples
    assert d.index_reads == 13
    assert ">s0000000</a>" in get(app, "/d/0/samples?start=31000")[1]  # entry 3100 = shard 0
    assert d.index_reads == 13  # cached
    assert "s0000039" in get(app, "/d/0/s/49999")[1]
    small = open_dataset(big, cache_samples=25)  # the LRU is bounded by samples too
    for g in (0, 10, 20, 30, 40):
        small.sample(g)
    assert small.index_reads == 5 and len(small._cache) == 2


# --- renderer plumbing ------------------------------------------------------------------------


def test_load_renderer_spec_and_errors():
    r = load_renderer("view_fixtures:load_gray_renderer", "4")
    assert isinstance(r, GrayRenderer) and r.cell == 4
    for spec, msg in (
        ("nocolon", "MODULE:CALLABLE"),
        ("no_such_mod_xyz:f", "cannot import"),
        ("view_fixtures:nope", "no callable"),
        ("view_fixtures:HOSTILE", "callable"),
        ("builtins:object", r"no render\("),
    ):
        with pytest.raises(ValueError, match=msg):
            load_renderer(spec)


def test_renderer_failure_is_an_error_picture(data):
    class Broken:
        def render(self, ids, block):
            raise RuntimeError("<boom>")

    app = App(open_source(data["manifest"]), renderer=Broken())
    status, svg, r = get(app, "/d/0/img/2/0.png")
    assert status == 500 and r.content_type == "image/svg+xml"
    assert "&lt;boom&gt;" in svg and "<boom>" not in svg
    assert get(app, "/d/0/s/2")[0] == 200


# --- data config ------------------------------------------------------------------------------


def test_mixture_page_has_the_numbers_of_wds_tools_mix(tmp_path):
    from wds_tools.mix_cli import dry_run

    from loader_fixtures import make_dataset, write_config

    a = make_dataset(str(tmp_path), "a", 0, 60, samples_per_shard=20)
    b = make_dataset(str(tmp_path), "b", 1, 40, samples_per_shard=20)
    cfg = write_config(
        str(tmp_path / "mix.yaml"),
        [{"name": "a", "manifest": a, "weight": 0.7}, {"name": "b", "manifest": b, "weight": 0.3}],
        seed=3,
    )
    app = App(open_source(cfg), mix_samples=400, batch_size=4)
    status, html, _ = get(app, "/")
    assert status == 200 and html.count("<polyline") == 2 and "stroke-dasharray" in html
    rep = dry_run(cfg, 400, batch_size=4)
    for d in rep["datasets"]:
        assert f"{d['sample_share']:.2%}" in html and f"{d['target_share']:.2%}" in html
        assert f"{d['max_deviation']:.1f}" in html
    mix, _ = app.mixture()
    assert mix.final == json.loads(json.dumps(rep, default=float))
    assert mix.samples == sorted(mix.samples) and mix.samples[-1] == 400
    assert 'href="/d/1/"' in get(app, "/d/1/")[1] and "wds-tools mix" in html


# --- command line -----------------------------------------------------------------------------


def test_cli_prints_url_and_serves(data):
    env = dict(os.environ, PYTHONPATH=HERE + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wds_tools.cli",
            "view",
            data["manifest"],
            "--port",
            "0",
            "--tokenizer",
            data["tok"],
            "--renderer",
            "view_fixtures:load_gray_renderer",
            "--renderer-arg",
            "8",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = p.stdout.readline()
            if not line:
                break
            if line.startswith("open http://127.0.0.1:"):
                url = line.split()[1]
        assert url, p.stderr.read() if p.poll() is not None else "no URL printed"
        status, body, _ = http_get(url, "/d/0/img/2/0.png")
        from PIL import Image

        assert status == 200 and Image.open(io.BytesIO(body)).size == (48, 48)  # cell 8
    finally:
        p.terminate()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["/no/such/index.json"], "no/such/index.json"),
        (["MANIFEST", "--renderer", "nocolon"], "MODULE:CALLABLE"),
        (["MANIFEST", "--tokenizer", "/no/tok"], "--tokenizer /no/tok"),
        (["MANIFEST", "--port", "70000"], "--port"),
    ],
)
def test_cli_errors_are_one_line(data, capsys, argv, msg):
    from wds_tools.cli import main

    argv = [data["manifest"] if a == "MANIFEST" else a for a in argv]
    assert main(["view", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("wds-tools view: error:") and msg in err and err.count("\n") == 1


def test_help_lists_view_flags(capsys):
    from wds_tools.cli import main

    with pytest.raises(SystemExit):
        main(["view", "--help"])
    out = capsys.readouterr().out
    for flag in ("--host", "--port", "--tokenizer", "--renderer", "--renderer-arg", "--cache-dir"):
        assert flag in out


def test_view_core_imports_without_torch():
    code = (
        "import sys, wds_tools.view, wds_tools.view.server, wds_tools.view.data; "
        "assert 'torch' not in sys.modules and 'lumina' not in sys.modules, "
        "[m for m in sys.modules if m.startswith(('torch', 'lumina'))][:3]"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- remote -----------------------------------------------------------------------------------


def _remote_checks(url: str, local_manifest: str, **io_kw) -> None:
    from wds_tools import io as wio

    opts = wio.IOOptions(timeout=5, connect_timeout=5, backoff=0.01, max_backoff=0.05, **io_kw)
    app = App(open_source(url, opts))
    html = get(app, "/")[1]
    assert '<div class="v">300</div><div class="k">samples</div>' in html
    assert "from all 3 shards (300 samples)" in html
    html = get(app, "/d/0/s/150")[1]
    assert ">s0000150</span></h1>" in html
    m = load_manifest(local_manifest)
    sh = Shard.open(m["shards"][1]["url"])
    with open(sh.url, "rb") as f:
        f.seek(sh.offsets[50])
        assert get(app, "/d/0/raw/150")[1] == f.read(sh.lengths[50])
    assert ">s0000042</a>" in get(app, "/d/0/samples?q=s0000042&field=key")[1]


@pytest.mark.network
def test_remote_nginx(remote_dataset, nginx, tmp_path):  # noqa: F811
    local = os.path.join(remote_dataset, "ds", "index.json")
    _remote_checks(f"{nginx.url}/ds/index.json", local)
    cache = tmp_path / "cache"  # --cache-dir: the same pages, shards kept locally
    _remote_checks(f"{nginx.url}/ds/index.json", local, cache_dir=str(cache))
    assert any(p.suffix == ".tar" for p in cache.rglob("*"))


@pytest.mark.network
def test_remote_s3(remote_dataset, s3_env):  # noqa: F811
    _remote_checks(f"s3://{BUCKET}/ds/index.json", os.path.join(remote_dataset, "ds", "index.json"))


def test_token_text_marks_special_and_out_of_vocabulary_ids(data):
    from tokenizers import Tokenizer

    from wds_tools.view.pages import TokenText

    tok = Tokenizer.from_file(os.path.join(data["tok"], "tokenizer.json"))
    text = TokenText(tok)
    ids = [tok.token_to_id("<s>")] + tok.encode("a <b> & c").ids + [60000]
    html = text.html(ids)
    assert html.startswith('<span class="sp" title="id 0">&lt;s&gt;</span>a &lt;b&gt; &amp; c')
    assert html.endswith(
        '<span class="sp oov" title="id 60000 is outside the tokenizer '
        f'({tok.get_vocab_size()} tokens)">#60000</span>'
    )


# --- lumina view: the real tiny renderer --------------------------------------------------------


@pytest.mark.slow
def test_lumina_view_draws_the_tiny_vqgan_pictures():
    """``lumina view --vq TINY``: make-tiny's VQGAN decodes the blocks back to the photos."""
    import argparse

    from PIL import Image

    from lumina import tiny
    from lumina import view as lumina_view
    from wds_tools.view import build_app

    from view_fixtures import tiny_lumina_dataset

    manifest, root = tiny_lumina_dataset()
    p = argparse.ArgumentParser()
    lumina_view.add_arguments(p)
    args = p.parse_args([manifest, "--vq", root, "--device", "cpu"])
    renderer = lumina_view.renderer_from_args(args)
    assert args.tokenizer == os.path.join(root, "vq", "text_tokenizer.json")
    app = build_app(args, renderer)
    html = get(app, "/d/0/s/1")[1]  # photo-chelsea (keys sorted)
    assert "A tabby cat looking to the side." in html and '<img src="/d/0/img/1/0.png"' in html
    assert '<span class="sp" title="id 0">&lt;s&gt;</span>Describe the photo.' in html
    status, png, _ = get(app, "/d/0/img/1/0.png")
    assert status == 200
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), np.float64)
    names = sorted(n[:-4] for n in os.listdir(tiny.DEMO_PHOTOS) if n.endswith(".jpg"))
    want = np.asarray(tiny.demo_photo_crops(256)[names.index("chelsea")], np.float64)
    assert got.shape == want.shape == (192, 288, 3)
    psnr = 10 * np.log10(255.0**2 / np.mean((got - want) ** 2))
    assert psnr > 15, psnr  # the photo, at 16x less detail (make-tiny says ~20 dB)


def test_lumina_view_refuses_vq_and_renderer_together(tmp_path):
    import argparse

    from lumina import view as lumina_view

    p = argparse.ArgumentParser()
    lumina_view.add_arguments(p)
    args = p.parse_args(["x", "--vq", str(tmp_path), "--renderer", "a:b"])
    with pytest.raises(ValueError, match="not both"):
        lumina_view.renderer_from_args(args)
    args = p.parse_args(["x", "--vq", str(tmp_path)])
    with pytest.raises(ValueError, match="no vqgan.yaml"):
        lumina_view.renderer_from_args(args)


def test_lumina_cli_has_view(capsys):
    from lumina.cli import main

    with pytest.raises(SystemExit):
        main(["view", "--help"])
    out = capsys.readouterr().out
    assert "--vq" in out and "--renderer" in out and "--tokenizer" in out


def test_odd_metadata_still_renders(tmp_path):
    """Metadata the tools do not expect (wrong types, blocks out of range) shows as data."""
    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    out = str(tmp_path / "odd")
    with ShardWriter(out, vocab_size=1000) as w:
        w.write(
            "odd-0",
            np.arange(20),
            labels=np.arange(20),
            meta={
                "images": [
                    {"offset": "x"},
                    5,
                    {"offset": 0, "num_tokens": 10**9},
                    {"offset": 2, "num_tokens": 4, "grid": "2x2"},
                ],
                "id": {"a": [1]},
                "source": 7,
            },
        )
        w.write("odd-1", np.arange(5), meta={"images": "none"})
    merge(out)
    app = App(open_source(out), renderer=GrayRenderer())
    for target in (
        "/",
        "/d/0/samples",
        "/d/0/s/0",
        "/d/0/s/1",
        "/d/0/samples?q=a&field=id",
        "/d/0/samples?q=7&field=source",
        "/d/0/samples?q=x&field=meta",
    ):
        assert get(app, target)[0] == 200, target
    html = get(app, "/d/0/s/0")[1]
    assert '<img src="/d/0/img/0/3.png"' in html and "images[3]" in html  # the block that fits
    status, body, r = get(app, "/d/0/img/0/3.png")  # grid "2x2" is not [rows, cols]
    assert status == 500 and r.content_type == "image/svg+xml"
    assert get(app, "/d/0/img/0/1.png")[0] == 404  # 5 is not a block
