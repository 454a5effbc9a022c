"""Reliability, bad input at every door: fuzzed pre-tokenizer items, data configs (parsed and as
YAML text), manifests and shard indexes (hypothesis, bounded), and hostile images through the
real pre-tokenizer run. Only the documented exception types, with one-line messages, may come
out; anything else is a defect."""

from __future__ import annotations

import json
import os
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from lumina.conversation import BadItem, parse_conversation
from lumina.input_items import JsonLine
from lumina.item_processing import ItemFailure, ItemPreparer, ItemSettings, PreparedItem
from wds_tools.config import load_data_config, parse_data_config
from wds_tools.format import FormatError
from wds_tools.merge import merge
from wds_tools.reader import iter_samples, load_manifest, open_shards
from wds_tools.verify import verify
from wds_tools.writer import ShardWriter

from lumina_fixtures import png_header_only, smooth_image
from reliability_log import record

pytestmark = pytest.mark.reliability


def FUZZ(n):
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=10,
)


def _one_line(msg: str) -> bool:
    return bool(msg) and "\n" not in msg and "\r" not in msg


# --- pre-tokenizer items -------------------------------------------------------------------------

roles = st.sampled_from(["human", "gpt", "assistant", "GPT", "Human", "system", "", None, 1])
texts = st.one_of(
    st.text(max_size=30),
    st.lists(
        st.sampled_from(["<|image|>", " ", "a", "\n", "<|image", "é", "\ud800", "<s>", "</s>", "\x00"]),
        max_size=6,
    ).map("".join),
    json_values,
)
turns = st.fixed_dictionaries({"from": roles, "value": texts}) | json_values
plain_text = st.text(max_size=20) | st.lists(
    st.sampled_from(["<|image|>", " ", "hi", "\n", "\ud800", "é", "<s>", "\x00", "😀"]), max_size=5
).map("".join)
valid_ish = st.builds(
    lambda vals, img: dict(
        {"conversations": [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(vals)]}, **img
    ),
    st.lists(plain_text, min_size=2, max_size=4),
    st.sampled_from([{}, {"image": "missing.png"}, {"image": []}, {"image": ["a.png", "b.png"]}]),
)
items = st.one_of(
    valid_ish,
    valid_ish,
    json_values,
    st.fixed_dictionaries(
        {"conversations": st.lists(turns, max_size=4) | json_values},
        optional={
            "image": st.none()
            | st.text(max_size=10)
            | st.lists(st.text(max_size=6) | json_scalars, max_size=3)
            | json_values,
            "id": json_values,
        },
    ),
)


@pytest.fixture(scope="module")
def preparer(tiny_dirs):
    return ItemPreparer(ItemSettings(tokenizer=tiny_dirs[0], target_size=64, crop="center"))


def test_fuzz_pretokenizer_items(preparer, tmp_path, monkeypatch):
    counts = {"tried": 0, "ok": 0, "bad": 0}

    @FUZZ(150)
    @given(item=items, as_line=st.booleans())
    def run(item, as_line):
        counts["tried"] += 1
        try:
            parse_conversation(item)
        except BadItem as e:
            assert _one_line(str(e))
        raw = JsonLine(json.dumps(item)) if as_line else item
        out = preparer(counts["tried"], raw)
        if isinstance(out, ItemFailure):
            assert out.reason != "unexpected_error", out.message
            assert _one_line(out.message), out.message
            counts["bad"] += 1
        else:
            assert isinstance(out, PreparedItem) and out.tokens.ndim == 1
            counts["ok"] += 1

    monkeypatch.chdir(tmp_path)  # relative fuzzed image paths resolve in an empty folder
    run()
    # raw .jsonl lines that are not JSON at all
    for line in ["{", "[1,2", '"\\ud800"', "nul\x00l", '{"conversations": [' * 50, "1e999"]:
        out = preparer(0, JsonLine(line))
        assert isinstance(out, ItemFailure) and out.reason != "unexpected_error", out
        counts["tried"] += 1
        counts["bad"] += 1
    record(
        "input",
        "fuzz: pre-tokenizer items",
        tried=counts["tried"],
        injected=counts["bad"],
        detected=counts["bad"],
        note=f"{counts['ok']} valid, {counts['bad']} reported as bad items (no unexpected_error)",
    )


# --- data config ---------------------------------------------------------------------------------

entry = st.fixed_dictionaries(
    {},
    optional={
        "name": json_scalars | st.sampled_from(["a", "b", "x" * 81, "bad name"]),
        "manifest": json_scalars
        | st.sampled_from(
            [
                "d/index.json",
                "pipe:cat x",
                "file://h/x",
                "https://u:p@h/x.json?sig=1",
                "ftp://x",
                "s3://",
                "https://h:99999/x",
                "/abs/index.json",
                "",
            ]
        ),
        "weight": json_scalars,
        "max_epochs": json_scalars,
        "group": json_scalars,
        "weight_by": json_scalars,
        "extra": json_scalars,
    },
)
meta_entry = st.fixed_dictionaries(
    {},
    optional={
        "path": st.sampled_from(["d/index.json", "pipe:x", "s3://b/i.json"]) | json_scalars,
        "type": json_scalars,
        "ratio": json_scalars,
        "name": json_scalars,
        "max_epochs": json_scalars,
    },
)
valid_cfg = st.fixed_dictionaries(
    {
        "datasets": st.lists(
            st.fixed_dictionaries(
                {
                    "manifest": st.sampled_from(
                        [
                            "d/index.json",
                            "/abs/index.json",
                            "s3://b/i.json",
                            "https://h/d/index.json",
                            "file:///x/index.json",
                        ]
                    )
                },
                optional={
                    "weight": st.floats(0.01, 100),
                    "max_epochs": st.integers(1, 5),
                    "group": st.sampled_from(["a", "b", 3]),
                },
            ),
            min_size=1,
            max_size=3,
            unique_by=lambda e: e["manifest"],
        )
    },
    optional={
        "seed": st.integers(0, 2**40),
        "weight_by": st.sampled_from(["samples", "tokens"]),
        "on_error": st.sampled_from(["skip", "fail"]),
        "shuffle": st.booleans(),
        "allowed_roots": st.sampled_from([["/abs"], ["s3://b/"], ["d"], ["/"]]),
    },
)
configs = st.one_of(
    valid_cfg,
    valid_cfg,
    json_values,
    st.fixed_dictionaries(
        {},
        optional={
            "datasets": st.lists(entry | json_values, max_size=3) | json_values,
            "META": st.lists(meta_entry, max_size=3) | json_values,
            "seed": json_scalars,
            "weight_by": json_scalars | st.sampled_from(["samples", "tokens"]),
            "on_error": json_scalars | st.sampled_from(["skip", "fail"]),
            "shuffle": json_values
            | st.fixed_dictionaries(
                {},
                optional={
                    "shards": json_scalars,
                    "samples": json_scalars,
                    "block_size": json_scalars,
                    "window_blocks": json_scalars,
                    "x": json_scalars,
                },
            ),
            "allow_pipe": json_scalars,
            "allowed_roots": json_values | st.lists(st.text(max_size=8), max_size=2),
            "unknown": json_scalars,
        },
    ),
)


def test_fuzz_data_config(tmp_path):
    counts = {"tried": 0, "valid": 0, "refused": 0}

    @FUZZ(200)
    @given(doc=configs)
    def run(doc):
        counts["tried"] += 1
        try:
            cfg = parse_data_config(doc, where="data.yaml", base_dir=str(tmp_path))
        except ValueError as e:
            assert _one_line(str(e)) and str(e).startswith("data.yaml"), str(e)
            counts["refused"] += 1
            return
        counts["valid"] += 1
        assert cfg.datasets and all(d.weight > 0 for d in cfg.datasets)

    run()

    @FUZZ(80)
    @given(
        text=st.text(max_size=60)
        | st.sampled_from(
            [
                "datasets: [",
                "{a: 1",
                "- - -",
                "datasets: !!python/name:os.system",
                "? [1]\n: 2",
                "&a [*a]",
                "datasets: *x",
                "\t- x",
                "seed: 1e400",
                "datasets: {a: [}",
            ]
        )
    )
    def run_yaml(text):
        counts["tried"] += 1
        p = tmp_path / "fuzz.yaml"
        p.write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_data_config(str(p))
        except ValueError as e:
            assert _one_line(str(e)), str(e)
            counts["refused"] += 1
            return
        counts["valid"] += 1

    run_yaml()
    record(
        "input",
        "fuzz: data config YAML",
        tried=counts["tried"],
        injected=counts["refused"],
        detected=counts["refused"],
        note=f"{counts['valid']} valid; every refusal a one-line ValueError naming the file",
    )


# --- manifests and shard indexes -----------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ds(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_ds")
    with ShardWriter(str(root), vocab_size=300, max_samples=3) as w:
        for i in range(6):
            w.write(f"k{i}", np.arange(i + 4) % 300, labels=np.arange(i + 4) % 300)
    merge(str(root))
    return str(root)


def _paths(doc, prefix=()):
    """Every (key path) into a JSON document."""
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, prefix + (i,))
    return out


def _mutate(doc, path, action, value):
    doc = json.loads(json.dumps(doc))
    if not path:
        return value
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if action == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


def test_fuzz_manifests_and_indexes(small_ds, tmp_path):
    work = str(tmp_path / "ds")
    shutil.copytree(small_ds, work)
    man_path = os.path.join(work, "index.json")
    idx_path = os.path.join(work, "shard-r00000-000001.idx.json")
    originals = {p: open(p).read() for p in (man_path, idx_path)}
    docs = {p: json.loads(t) for p, t in originals.items()}
    counts = {"tried": 0, "refused": 0, "read": 0}

    @FUZZ(150)
    @given(
        which=st.sampled_from([man_path, idx_path]),
        data=st.data(),
        action=st.sampled_from(["set", "set", "delete"]),
        value=json_values,
        raw=st.none() | st.binary(max_size=40),
    )
    def run(which, data, action, value, raw):
        counts["tried"] += 1
        doc = docs[which]
        path = data.draw(st.sampled_from(_paths(doc)))
        if action == "delete" and (not path or isinstance(path[-1], int)):
            action = "set"
        try:
            with open(which, "wb") as f:
                if raw is not None and action == "delete":
                    f.write(raw)
                else:
                    f.write(json.dumps(_mutate(doc, path, action, value)).encode())
            for call in (
                lambda: load_manifest(man_path),
                lambda: open_shards(man_path),
                lambda: list(iter_samples(man_path)),
                lambda: list(iter_samples(man_path, on_error="skip")),
                lambda: verify(man_path),
            ):
                try:
                    call()
                    counts["read"] += 1
                except (FormatError, OSError) as e:
                    assert _one_line(str(e)), str(e)
                    counts["refused"] += 1
        finally:
            for p, t in originals.items():
                with open(p, "w") as f:
                    f.write(t)

    run()
    record(
        "input",
        "fuzz: manifests",
        tried=counts["tried"],
        injected=counts["tried"],
        detected=counts["refused"],
        note=f"{counts['refused']} refusals and {counts['read']} "
        "clean reads over 5 entry points; only FormatError/OSError",
    )


# --- hostile images through the real pre-tokenizer -------------------------------------------------


def _hostile_images(d: Path) -> dict:
    """name -> (path, expected failure reason or None for a usable image)."""
    d.mkdir(parents=True, exist_ok=True)
    good = Image.fromarray(smooth_image(80, 120, 1))
    out = {}

    def save(name, fn, reason):
        p = d / name
        fn(p)
        out[name] = (str(p), reason)

    save("bomb_header.png", lambda p: png_header_only(p, 60000, 60000), "oversize_image")
    save("huge_dims.png", lambda p: png_header_only(p, 2**31 - 1, 2), "oversize_image")
    save("bomb_deflate.png", lambda p: Image.new("1", (20000, 20000)).save(p), "oversize_image")
    save("thin.png", lambda p: Image.new("L", (1, 20000), 7).save(p), "oversize_image")
    good_png = d / "g.png"
    good.save(good_png)
    data = good_png.read_bytes()
    save("truncated.png", lambda p: p.write_bytes(data[: len(data) // 2]), "unreadable_image")
    good.save(d / "g.jpg", quality=90)
    jdata = (d / "g.jpg").read_bytes()
    save("truncated.jpg", lambda p: p.write_bytes(jdata[: len(jdata) // 3]), "unreadable_image")
    save("png_named.jpg", lambda p: p.write_bytes(data), None)  # wrong extension, valid content
    save(
        "text_named.png",
        lambda p: p.write_text("<svg xmlns='http://www.w3.org/2000/svg'/>"),
        "unreadable_image",
    )
    save("empty.png", lambda p: p.write_bytes(b""), "unreadable_image")
    save("dir.png", lambda p: p.mkdir(), "unreadable_image")
    save("fifo.png", lambda p: os.mkfifo(p), "unreadable_image")
    save("zero_size.gif", lambda p: p.write_bytes(b"GIF89a\x00\x00\x00\x00\x00\x00\x00;"), "unreadable_image")
    save("cmyk.jpg", lambda p: good.convert("CMYK").save(p), None)
    save(
        "i16.png",
        lambda p: Image.fromarray((smooth_image(70, 90, 2)[..., 0].astype(np.uint16) * 200)).save(p),
        None,
    )
    save("palette_alpha.png", lambda p: good.convert("P").save(p, transparency=3), None)
    save("one_pixel.png", lambda p: Image.new("RGB", (1, 1), (9, 9, 9)).save(p), None)
    return out


def test_hostile_images_through_the_pretokenizer(tiny_dirs, tmp_path):
    from lumina.pre_tokenize import PreTokenizeConfig, run_config

    images = _hostile_images(tmp_path / "img")
    names = sorted(images)
    items = [
        {
            "conversations": [
                {"from": "human", "value": "<|image|> what?"},
                {"from": "gpt", "value": "a picture"},
            ],
            "image": images[n][0],
        }
        for n in names
    ]
    src = tmp_path / "items.json"
    src.write_text(json.dumps(items))
    cfg = PreTokenizeConfig(
        in_filename=str(src),
        out_dir=str(tmp_path / "out"),
        tokenizer=tiny_dirs[0],
        vq_model=tiny_dirs[1],
        target_size=256,
        num_workers=0,
        progress=False,
        batch_size=4,
        max_samples_per_shard=8,
    )
    timer = threading.Timer(120, lambda: os.kill(os.getpid(), signal.SIGALRM))
    old = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("hang")))
    timer.start()
    try:
        summary = run_config(cfg)  # no crash, no hang
    finally:
        timer.cancel()
        signal.signal(signal.SIGALRM, old)
    errors = {
        e["index"]: e
        for e in map(json.loads, (tmp_path / "out" / "errors-r00000.jsonl").read_text().splitlines())
    }
    expected_bad = {i for i, n in enumerate(names) if images[n][1] is not None}
    for i, n in enumerate(names):
        want = images[n][1]
        if want is None:
            assert i not in errors, (n, errors.get(i))
        else:
            assert errors[i]["reason"] == want, (n, errors[i])
            assert _one_line(errors[i]["message"]) and images[n][0] in errors[i]["message"]
    assert summary.num_failed == len(expected_bad)
    man = merge(str(tmp_path / "out"))
    assert man["num_samples"] == len(names) - len(expected_bad)
    record(
        "input",
        "hostile images",
        tried=len(names),
        injected=len(expected_bad),
        detected=len([i for i in expected_bad if i in errors]),
        note="bombs (header, deflate), huge dims, 1x20000, truncated png/jpg, wrong extension, "
        "text/empty/dir/FIFO, zero-size gif; odd modes (CMYK, I;16, P+alpha, 1x1) encode",
    )
