"""`wds-tools` as a user runs it: help texts, inspect, verify, merge."""

import json
import subprocess
import sys

import numpy as np
import pytest

from wds_tools.cli import SUBCOMMANDS, main
from wds_tools.merge import merge
from wds_tools.writer import ShardWriter


def run_cli(*args):
    p = subprocess.run([sys.executable, "-m", "wds_tools.cli", *args], capture_output=True, text=True)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(str(tmp_path), vocab_size=1000, max_samples=4) as w:
        for i in range(10):
            ids = rng.integers(0, 1000, size=20)
            labels = np.where(np.arange(20) >= 8, ids, -100)
            w.write(
                f"s{i:02d}",
                ids,
                labels=labels,
                meta={"index": i, "images": [{"offset": 2, "num_tokens": 4, "w": 64, "h": 32}]},
            )
    merge(str(tmp_path))
    return tmp_path


def test_help_of_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    for name in ("inspect", "verify", "merge"):
        with pytest.raises(SystemExit):
            main([name, "--help"])
        assert "usage: wds-tools " + name in capsys.readouterr().out


def test_inspect_table_json_key_and_dump(dataset):
    rc, out, _ = run_cli("inspect", str(dataset / "index.json"), "--limit", "3")
    assert rc == 0
    assert "s00" in out and "64x32" in out and "... 7 more samples" in out
    assert "total: 3 shards, 10 samples, 200 tokens (120 supervised), 10 images" in out
    rc, out, _ = run_cli("inspect", str(dataset / "index.json"), "--json")
    doc = json.loads(out)
    assert doc["totals"]["samples"] == 10 and len(doc["samples"]) == 10
    rc, out, _ = run_cli("inspect", str(dataset / "shard-r00000-000001.tar"), "--key", "s05")
    assert rc == 0 and "key: s05" in out and "<image 64x32: 4 tokens>" in out and "[train]" in out
    rc, out, _ = run_cli("inspect", str(dataset / "index.json"), "--dump")
    lines = [json.loads(x) for x in out.splitlines()]
    assert [x["key"] for x in lines] == [f"s{i:02d}" for i in range(10)]
    assert lines[0]["labels"][:8] == [-100] * 8 and lines[0]["labels"][8:] == lines[0]["input_ids"][8:]


def test_inspect_decodes_with_tokenizer(dataset, tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(1000)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    d = tmp_path_factory.mktemp("tok")
    tok.save(str(d / "tokenizer.json"))
    rc, out, err = run_cli("inspect", str(dataset / "index.json"), "--key", "s01", "--tokenizer", str(d))
    assert rc == 0, err
    assert "'w" in out  # decoded words, not raw ids


def test_bad_input_is_one_clear_line(tmp_path):
    rc, _, err = run_cli("inspect", str(tmp_path / "nope.tar"))
    assert rc == 2 and err.count("\n") == 1 and "nope" in err
    rc, _, err = run_cli("inspect", str(tmp_path / "x.json"))
    assert rc == 2 and "no such file" in err.lower()


def test_verify_and_merge_exit_codes(dataset):
    assert run_cli("verify", str(dataset / "index.json"))[0] == 0
    with open(dataset / "shard-r00000-000002.tar", "r+b") as f:
        f.seek(700)
        f.write(b"\x7f")
    rc, out, _ = run_cli("verify", str(dataset / "index.json"))
    assert rc == 1 and "sha256 mismatch" in out
    rc, _, err = run_cli("merge", str(dataset))
    assert rc == 1 and "shard-r00000-000002.tar: sha256 mismatch" in err
