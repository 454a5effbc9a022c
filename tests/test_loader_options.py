"""Data-config switches that reach the I/O layer: verify_checksums and allow_pipe."""

import numpy as np
import pytest

from wds_tools.config import parse_data_config
from wds_tools.format import FormatError
from wds_tools.loader import build_loader
from wds_tools.merge import merge
from wds_tools.reader import Shard
from wds_tools.writer import ShardWriter


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    originals = {}
    with ShardWriter(str(tmp_path), vocab_size=1000, max_samples=8) as w:
        for i in range(32):
            ids = rng.integers(0, 1000, size=40)
            w.write(f"s{i:03d}", ids, labels=ids)
            originals[f"s{i:03d}"] = ids
    merge(str(tmp_path))
    return tmp_path, originals


def _keys_and_ids(cfg, n):
    out = []
    for b in build_loader(cfg, rank=0, world_size=1, batch_size=4, num_workers=0, max_seq_len=64):
        out += list(zip(b["__key__"], b["input_ids"].tolist()))
        if len(out) >= n:
            return out[:n]
    return out


def _flip_token_byte(root):
    sh = Shard.open(str(root / "shard-r00000-000001.tar"))
    pos = sh.offsets[3] + 512 + 128 + 10  # inside the token ids of the 4th sample
    with open(sh.url, "r+b") as f:
        f.seek(pos)
        b = f.read(1)
        f.seek(pos)
        f.write(bytes([b[0] ^ 0x01]))
    return sh.keys[3]


def test_verify_checksums_catches_a_flipped_token_byte(dataset):
    root, originals = dataset
    key = _flip_token_byte(root)
    base = {"seed": 0, "datasets": [{"manifest": str(root / "index.json"), "max_epochs": 1}]}
    # Without it, the flip inside token data decodes cleanly (only content hashing sees it).
    plain = dict(_keys_and_ids(parse_data_config(base), 32))
    assert plain[key] != originals[key].tolist()
    with pytest.raises(FormatError, match="sha256"):
        _keys_and_ids(parse_data_config(dict(base, verify_checksums=True)), 32)
    got = _keys_and_ids(parse_data_config(dict(base, verify_checksums=True, on_error="skip")), 32)
    assert got and all(originals[k].tolist() == ids for k, ids in got)  # nothing altered
    assert key not in dict(got)


def test_config_allow_pipe_reaches_the_io_layer(dataset):
    root, originals = dataset
    manifest = f"pipe:cat {root / 'index.json'}"
    with pytest.raises(ValueError, match="allow_pipe"):
        parse_data_config({"datasets": [{"manifest": manifest}]})
    cfg = parse_data_config({"allow_pipe": True, "datasets": [{"name": "p", "manifest": manifest}]})
    loader = build_loader(cfg, rank=0, world_size=1, batch_size=4, num_workers=0, max_seq_len=64)
    assert loader.plans[0].num_samples == 32
