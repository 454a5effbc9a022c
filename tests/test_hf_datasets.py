"""Hugging Face ``datasets`` reads the shards through its ``webdataset`` builder (local files,
offline): columns ``input_ids.npy`` and ``json``, ids equal to the reader's, labels rebuilt from
the ``json`` column's ``supervised`` spans; ``wds_tools.wds.hf_features`` keeps metadata whose
schema changes after the first samples (which the builder's inference drops or fails on)."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from wds_tools.format import spans_to_labels
from wds_tools.reader import iter_samples
from wds_tools.wds import hf_features
from wds_tools.writer import ShardWriter

from loader_fixtures import make_dataset

datasets = pytest.importorskip("datasets")


@pytest.fixture
def load(tmp_path, monkeypatch):
    """``load_dataset("webdataset", ...)`` offline, with its cache in ``tmp_path``."""
    for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(k, "1")
        if hasattr(datasets.config, k):  # read at import: set it where it is kept, too
            monkeypatch.setattr(datasets.config, k, True)

    def _load(tars, **kw):
        return datasets.load_dataset(
            "webdataset",
            data_files={"train": tars},
            split="train",
            cache_dir=str(tmp_path / "hf_cache"),
            **kw,
        )

    return _load


def test_load_dataset_webdataset_reads_ids_and_supervision(tmp_path, load):
    manifest = make_dataset(str(tmp_path), "a", 0, 40, shard_sizes=(25, 15))
    ref = list(iter_samples(manifest))
    ds = load(sorted(glob.glob(os.path.join(tmp_path, "a", "*.tar"))))
    assert set(ds.column_names) == {"input_ids.npy", "json", "__key__", "__url__"}
    assert ds.features["input_ids.npy"].feature.dtype == "uint16"
    assert len(ds) == len(ref)
    for row, r in zip(ds, ref):
        assert row["__key__"] == r["__key__"]
        ids = np.asarray(row["input_ids.npy"], dtype=np.uint16)
        np.testing.assert_array_equal(ids, r["input_ids"])
        labels = spans_to_labels(ids, row["json"]["supervised"])  # as docs/streaming.md says
        np.testing.assert_array_equal(labels, r["labels"])


def test_hf_features_keep_metadata_that_changes_shape(tmp_path, load):
    # text-only items first ("images": [], no "id"), image items later: the builder infers the
    # json schema from the first 5 samples, so without features= this fails or drops keys
    metas = [{"images": []}] * 6 + [{"images": [{"offset": 1, "height": 2}], "id": "x"}] * 4
    with ShardWriter(str(tmp_path), vocab_size=65536) as w:
        for i, meta in enumerate(metas):
            ids = np.arange(5 + i, dtype=np.uint16)
            labels = np.where(np.arange(ids.size) >= 2, ids.astype(np.int64), -100)
            w.write(f"k{i:03d}", ids, labels=labels, meta=meta)
    tars = sorted(glob.glob(os.path.join(tmp_path, "*.tar")))
    ds = load(tars, features=hf_features("uint16"))
    assert [row["json"]["meta"] for row in ds] == metas
    assert [row["json"]["supervised"] for row in ds] == [[[2, 5 + i]] for i in range(10)]
