"""Reliability, security: nothing unpickled on a read path; ``pipe:`` and local paths outside the
allowed roots refused in data configs unless allowed; manifest entries cannot leave the dataset
folder; no credentials or signatures in messages."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle

import numpy as np
import pytest

from wds_tools import io as wio
from wds_tools.config import config_summary, load_data_config, parse_data_config
from wds_tools.format import FormatError, _member
from wds_tools.loader import iter_mixed as loader_samples
from wds_tools.merge import merge
from wds_tools.reader import Shard, iter_samples, iter_tar, load_manifest, open_shards
from wds_tools.verify import verify
from wds_tools.writer import ShardWriter

from reliability_log import record

pytestmark = pytest.mark.reliability


class _Evil:
    """Unpickling this creates ``marker`` (a harmless stand-in for running code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_dataset(root, marker):
    """A shard whose ids member is a pickled object array, plus a ``.pickle`` member, with an
    index and manifest that describe it as if it were valid."""
    os.makedirs(root, exist_ok=True)
    npy = io.BytesIO()
    np.save(npy, np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    doc = json.dumps({"supervised": [[0, 1]], "meta": {}}).encode()
    body = (
        _member("evil.input_ids.npy", npy.getvalue())
        + _member("evil.json", doc)
        + _member("evil.pickle", pickle.dumps(_Evil(marker)))
    )
    data = body + b"\0" * 1024
    with open(os.path.join(root, "shard-r00000-000000.tar"), "wb") as f:
        f.write(data)
    index = {
        "format": "wds-tokens",
        "version": "1.0",
        "kind": "shard_index",
        "shard": "shard-r00000-000000.tar",
        "shard_id": 0,
        "rank": 0,
        "world_size": 1,
        "dtype": "uint8",
        "vocab_size": 256,
        "tokenizer": None,
        "num_samples": 1,
        "num_tokens": 1,
        "num_supervised": 1,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "cursor": 1,
        "samples": {
            "key": ["evil"],
            "offset": [0],
            "length": [len(body)],
            "num_tokens": [1],
            "num_supervised": [1],
        },
    }
    json.dump(index, open(os.path.join(root, "shard-r00000-000000.idx.json"), "w"))
    manifest = {
        "format": "wds-tokens",
        "version": "1.0",
        "kind": "manifest",
        "dtype": "uint8",
        "vocab_size": 256,
        "tokenizer": None,
        "num_shards": 1,
        "num_samples": 1,
        "num_tokens": 1,
        "num_supervised": 1,
        "bytes": len(data),
        "num_failed": 0,
        "ranks": [],
        "shards": [
            {
                "path": "shard-r00000-000000.tar",
                "index": "shard-r00000-000000.idx.json",
                "rank": 0,
                "shard_id": 0,
                "num_samples": 1,
                "num_tokens": 1,
                "num_supervised": 1,
                "bytes": len(data),
                "sha256": index["sha256"],
            }
        ],
    }
    json.dump(manifest, open(os.path.join(root, "index.json"), "w"))
    return os.path.join(root, "index.json")


def test_nothing_is_unpickled_on_any_read_path(tmp_path, monkeypatch):
    marker = str(tmp_path / "PWNED")
    man = _evil_dataset(str(tmp_path / "evil"), marker)
    calls = []
    real_loads = pickle.loads
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: calls.append("loads") or real_loads(*a, **k))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: calls.append("load"))
    monkeypatch.setattr(pickle, "Unpickler", lambda *a, **k: calls.append("Unpickler"))
    paths = 0
    with pytest.raises(FormatError, match="evil"):
        list(iter_samples(man))
    paths += 1
    with pytest.raises(FormatError, match="not a loadable .npy"):
        list(iter_tar(str(tmp_path / "evil" / "shard-r00000-000000.tar")))
    paths += 1
    with pytest.raises(FormatError):
        Shard.open(str(tmp_path / "evil" / "shard-r00000-000000.tar")).read(0)
    paths += 1
    rep = verify(man)
    assert not rep["ok"]
    paths += 1
    cfg = parse_data_config({"on_error": "fail", "datasets": [{"manifest": man, "max_epochs": 1}]})
    with pytest.raises(FormatError):
        list(loader_samples(cfg))
    paths += 1
    assert not os.path.exists(marker) and calls == []
    record(
        "security",
        "pickle",
        injected=2,
        tried=paths,
        detected=paths,
        note="pickled object array + .pickle member: reader, tar walk, Shard.read, verify, "
        "loader; no unpickler called",
    )


# --- data config: pipe:, file://, allowed roots --------------------------------------------------


def _cfg(manifest, **top):
    return dict(top, datasets=[{"name": "d", "manifest": manifest}])


def test_config_refuses_pipe_and_paths_outside_allowed_roots(tmp_path):
    root = tmp_path / "data"
    (root / "ds").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    os.symlink(str(tmp_path / "elsewhere"), str(root / "link"))
    refused = tried = 0

    def refuses(doc, match, **kw):
        nonlocal refused, tried
        tried += 1
        with pytest.raises(ValueError, match=match) as e:
            parse_data_config(doc, where="data.yaml", base_dir=str(tmp_path), **kw)
        assert "\n" not in str(e.value)
        refused += 1
        return str(e.value)

    refuses(_cfg("pipe:curl -s http://x/index.json"), "allow_pipe")
    assert parse_data_config(_cfg("pipe:cat i.json", allow_pipe=True)).allow_pipe
    assert parse_data_config(_cfg("pipe:cat i.json"), allow_pipe=True).allow_pipe
    refuses(_cfg("file://otherhost/data/index.json"), "another host")
    refuses(_cfg("ftp://host/index.json"), "unsupported URL scheme")
    refuses(_cfg("gopher://host/index.json"), "unsupported URL scheme")
    roots = {"allowed_roots": [str(root)]}
    inside = str(root / "ds" / "index.json")
    assert parse_data_config(_cfg(inside, **roots)).datasets[0].manifest == inside
    assert parse_data_config(_cfg("file://" + inside, **roots)).datasets[0].manifest == inside
    assert parse_data_config(_cfg("data/ds/index.json", **roots), base_dir=str(tmp_path))
    refuses(_cfg("/etc/index.json", **roots), "outside the allowed roots")
    refuses(_cfg("file:///etc/index.json", **roots), "outside the allowed roots")
    refuses(_cfg(str(root / "ds" / ".." / ".." / "x" / "index.json"), **roots), "outside")
    refuses(_cfg("data/../elsewhere/index.json", **roots), "outside")
    refuses(_cfg(str(root / "link" / "index.json"), **roots), "outside")  # symlink out
    refuses(_cfg(str(tmp_path / "data2" / "index.json"), **roots), "outside")  # prefix only
    refuses(_cfg("https://evil.example/ds/index.json", **roots), "outside")
    refuses(_cfg("pipe:cat index.json", allow_pipe=True, **roots), "allowed_roots")
    url_roots = {"allowed_roots": ["https://data.example/ds/", "s3://bucket/train"]}
    assert parse_data_config(_cfg("https://data.example/ds/a/index.json", **url_roots))
    assert parse_data_config(_cfg("s3://bucket/train/index.json", **url_roots))
    refuses(_cfg("https://data.example/ds/../private/index.json", **url_roots), "outside")
    refuses(_cfg("https://data.example.evil/ds/index.json", **url_roots), "outside")
    refuses(_cfg("s3://bucket/training-private/index.json", **url_roots), "outside")
    refuses(_cfg("s3://bucket2/train/index.json", **url_roots), "outside")
    # the caller's roots hold whatever the config says
    refuses(_cfg("/etc/index.json", allowed_roots=["/"]), "outside", allowed_roots=[str(root)])
    assert parse_data_config(_cfg(inside), allowed_roots=[str(root)])
    refuses(dict(_cfg(inside), allowed_roots="  "), "allowed_roots")
    refuses(dict(_cfg(inside), allow_pipe="yes"), "allow_pipe")
    record(
        "security",
        "pipe: and file:// roots",
        injected=refused,
        tried=tried,
        detected=refused,
        note="pipe:, file://otherhost, unknown schemes, .., symlink, prefix tricks, URL roots",
    )


def test_yaml_config_cannot_construct_python_objects(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("datasets: !!python/object/apply:os.mkdir ['%s']\n" % (tmp_path / "PWNED"))
    with pytest.raises(ValueError, match="not valid YAML") as e:
        load_data_config(str(p))
    assert "\n" not in str(e.value) and not (tmp_path / "PWNED").exists()
    record("security", "pickle", injected=1, tried=1, detected=1, note="YAML python tag refused")


# --- manifest entries escaping the dataset folder -------------------------------------------------


def _small_dataset(root):
    with ShardWriter(str(root), vocab_size=300, max_samples=2) as w:
        for i in range(4):
            w.write(f"k{i}", np.arange(i + 3) % 300, labels=np.arange(i + 3) % 300)
    merge(str(root))
    return os.path.join(str(root), "index.json")


ESCAPES = [
    "../outside/shard.tar",
    "sub/../../outside/shard.tar",
    "/etc/passwd",
    "https://other.example/shard.tar",
    "s3://bucket/shard.tar",
    "file:///etc/passwd",
    "pipe:cat /etc/passwd",
    "~/shard.tar",
    "..",
    "C:/Windows/shard.tar",
    "https://u:secretpw@other.example/x.tar?X-Amz-Signature=SIGSECRET",
]


@pytest.mark.parametrize("field", ["path", "index"])
def test_manifest_entries_cannot_leave_the_dataset_folder(tmp_path, field, caplog):
    man = _small_dataset(tmp_path / "ds")
    doc = json.load(open(man))
    refused = 0
    for bad in ESCAPES:
        d = json.loads(json.dumps(doc))
        d["shards"][1][field] = bad
        json.dump(d, open(man, "w"))
        strict = None if not bad.startswith("/") else False
        for call in (
            lambda s=strict: load_manifest(man, allow_outside_root=s),
            lambda s=strict: open_shards(man, allow_outside_root=s),
            lambda s=strict: list(iter_samples(man, on_error="skip", allow_outside_root=s)),
        ):
            with pytest.raises(FormatError, match=r"shards\[1\]\.%s" % field) as e:
                call()
            msg = str(e.value)
            assert "leaves the dataset folder" in msg and "\n" not in msg
            assert "secretpw" not in msg and "SIGSECRET" not in msg
        refused += 1
    # through the loader (its default: absolute local paths accepted, the rest refused)
    d = json.loads(json.dumps(doc))
    d["shards"][1][field] = "../outside/x"
    json.dump(d, open(man, "w"))
    with pytest.raises(ValueError, match="leaves the dataset folder"):
        list(loader_samples(parse_data_config({"datasets": [{"manifest": man, "max_epochs": 1}]})))
    # explicitly allowed: an entry outside is followed
    os.makedirs(tmp_path / "other")
    for f in os.listdir(tmp_path / "ds"):
        if f.startswith("shard-r00000-000001"):
            os.rename(tmp_path / "ds" / f, tmp_path / "other" / f)
    d = json.loads(json.dumps(doc))
    d["shards"][1]["path"] = "../other/shard-r00000-000001.tar"
    d["shards"][1]["index"] = "../other/shard-r00000-000001.idx.json"
    json.dump(d, open(man, "w"))
    assert len(list(iter_samples(man, allow_outside_root=True))) == 4
    with pytest.raises(FormatError):
        list(iter_samples(man))
    record(
        "security",
        "manifest escape",
        injected=refused,
        tried=len(ESCAPES),
        detected=refused,
        note=f"shards[].{field}: .., absolute, other-host URLs, pipe:, file://, ~, drive",
    )


def test_shard_index_cannot_name_a_shard_outside(tmp_path):
    _small_dataset(tmp_path / "ds")
    idx = os.path.join(str(tmp_path / "ds"), "shard-r00000-000000.idx.json")
    doc = json.load(open(idx))
    n = 0
    for bad in ("../x.tar", "/etc/passwd", "pipe:ls", "https://h/x.tar"):
        doc["shard"] = bad
        json.dump(doc, open(idx, "w"))
        with pytest.raises(FormatError, match="leaves the dataset folder"):
            open_shards(idx, allow_outside_root=False if bad.startswith("/") else None)
        n += 1
    record("security", "manifest escape", injected=n, tried=n, detected=n, note="shard index 'shard' field")


def test_no_credentials_in_messages(tmp_path, caplog):
    secret_url = "https://alice:hunter2pw@127.0.0.1:1/ds/index.json?X-Amz-Signature=SIGSECRET&t=1"
    outputs = []
    cfg = parse_data_config({"datasets": [{"manifest": secret_url}]})
    outputs.append(json.dumps(config_summary(cfg)))
    outputs.append(cfg.datasets[0].name)
    with pytest.raises(ValueError) as e:
        parse_data_config(
            {"datasets": [{"manifest": secret_url}], "allowed_roots": ["https://data.example/"]}
        )
    outputs.append(str(e.value))
    with pytest.raises(ValueError) as e:
        parse_data_config({"datasets": [{"manifest": "https://a:hunter2pw@h:99999/i.json"}]})
    outputs.append(str(e.value))
    opts = wio.IOOptions(max_retries=1, backoff=0.01, connect_timeout=1, timeout=1)
    with caplog.at_level("DEBUG"):
        with pytest.raises((OSError, ValueError)) as e:
            load_manifest(secret_url, opts)
        outputs.append(str(e.value))
        with pytest.raises((OSError, ValueError)) as e:
            list(loader_samples(cfg, io_options=opts))
        outputs.append(str(e.value))
        rep_err = None
        try:
            verify(secret_url, opts=opts)
        except (OSError, ValueError) as ex:
            rep_err = str(ex)
        outputs.append(rep_err or "")
    outputs.append(caplog.text)
    leaks = [o for o in outputs if "hunter2pw" in o or "SIGSECRET" in o or "alice" in o]
    assert leaks == []
    record(
        "security",
        "credentials in messages",
        injected=1,
        tried=len(outputs),
        detected=0,
        lost=len(leaks),
        note="config summary, derived name, config errors, reader, loader, verify errors and log lines",
    )
