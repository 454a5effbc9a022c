"""Small token datasets and data configs for the loader tests (written in a temp folder).

Every sample's first three tokens encode (dataset number, sample number // 65536, sample number
% 65536), so a test can check that a batch row holds the sample its key names. Sample lengths
vary (``min_len``..``max_len``); the first ``len // 4`` positions are unsupervised.
"""

from __future__ import annotations

import os
from typing import Dict, List, Sequence

import numpy as np
import yaml

from wds_tools.merge import merge
from wds_tools.writer import ShardWriter

VOCAB = 65536


def sample_tokens(ds: int, i: int, length: int, rng: np.random.Generator) -> np.ndarray:
    ids = rng.integers(3, VOCAB, length).astype(np.uint16)
    ids[:3] = (ds, i // 65536, i % 65536)
    return ids[:length]


def make_dataset(
    root: str,
    name: str,
    ds: int,
    num_samples: int,
    shard_sizes: Sequence[int] = (),
    samples_per_shard: int = 0,
    min_len: int = 4,
    max_len: int = 64,
    seed: int = 0,
) -> str:
    """Write a dataset of ``num_samples`` samples; shards hold ``shard_sizes`` samples each
    (uneven on purpose) or ``samples_per_shard``. Returns the manifest path."""
    out = os.path.join(root, name)
    rng = np.random.default_rng(seed + 1000 * ds)
    sizes = list(shard_sizes)
    if not sizes:
        per = samples_per_shard or num_samples
        sizes = [per] * (num_samples // per) + ([num_samples % per] if num_samples % per else [])
    assert sum(sizes) == num_samples
    i = 0
    for rank, size in enumerate(sizes):  # one writer "rank" per shard gives any shard sizes
        with ShardWriter(out, vocab_size=VOCAB, rank=rank, world_size=len(sizes), max_samples=size) as w:
            for _ in range(size):
                n = int(rng.integers(min_len, max_len + 1))
                ids = sample_tokens(ds, i, n, rng)
                labels = ids.astype(np.int64)
                labels[: n // 4] = -100
                w.write(f"{name}-{i:06d}", ids, labels=labels)
                i += 1
    merge(out)
    return os.path.join(out, "index.json")


def write_config(path: str, datasets: List[Dict], **top) -> str:
    doc = dict(top)
    doc["datasets"] = datasets
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


def decode_row(input_ids, attention_mask) -> tuple:
    """(dataset number, sample number, length) from a padded batch row."""
    n = int(attention_mask.sum())
    return int(input_ids[0]), int(input_ids[1]) * 65536 + int(input_ids[2]), n


def key_number(key: str) -> int:
    return int(key.rsplit("-", 1)[1])
