"""The pre-tokenize pipeline end to end: shards, bad items, ranks, resume after SIGKILL, legacy import."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lumina.pre_tokenize import PreTokenizeConfig, run_config
from lumina.pre_tokenize import main as pre_tokenize_main

from lumina_fixtures import killable_pretok_cmd, mixed_items, png_header_only

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
TARGET = 256


def _write_json(path, items):
    Path(path).write_text(json.dumps(items))
    return str(path)


def _cfg(tiny_dirs, in_file, out_dir, **kw):
    base = dict(
        in_filename=str(in_file),
        out_dir=str(out_dir),
        tokenizer=tiny_dirs[0],
        vq_model=tiny_dirs[1],
        target_size=TARGET,
        num_workers=0,
        progress=False,
        batch_size=3,
        max_samples_per_shard=4,
    )
    base.update(kw)
    return PreTokenizeConfig(**base)


def _merge_and_read(out_dir):
    from wds_tools.merge import merge
    from wds_tools.reader import iter_samples

    manifest = merge(str(out_dir), save_path=os.path.join(out_dir, "index.json"))
    samples = {}
    for s in iter_samples(os.path.join(out_dir, "index.json")):
        samples[s["__key__"]] = (s["input_ids"].astype(np.int64).tolist(), s["labels"].tolist(), s["meta"])
    return manifest, samples


def _errors(out_dir, rank=0):
    path = Path(out_dir) / f"errors-r{rank:05d}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    d = tmp_path_factory.mktemp("pretok_data")
    items = mixed_items(d / "images", n=12)
    return items, _write_json(d / "items.json", items)


@pytest.fixture(scope="module")
def one_rank(tiny_dirs, dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    summary = run_config(_cfg(tiny_dirs, dataset[1], out))
    return summary, _merge_and_read(out)


def test_one_rank_writes_every_item_in_order(one_rank, dataset):
    summary, (manifest, samples) = one_rank
    items = dataset[0]
    assert summary.num_ok == len(items) and summary.num_failed == 0
    assert manifest["num_samples"] == len(items) and manifest["num_failed"] == 0
    assert sorted(samples) == [f"{i:09d}" for i in range(len(items))]
    for key, (ids, labels, meta) in samples.items():
        i = int(key)
        assert meta["index"] == i and meta["id"] == f"item-{i}" and meta["source"] == "items.json"
        images = items[i].get("image", [])
        assert len(meta["images"]) == len(images if isinstance(images, list) else [images])
        assert len(ids) == len(labels) and any(lab != -100 for lab in labels)


def test_matches_reference_semantics(one_rank, dataset, tiny_dirs):
    """The CLI path (writer, reader, batching across items) keeps the reference tokens."""
    import torch
    from test_lumina_fidelity import TARGET as FID_TARGET
    from test_lumina_fidelity import ref_process_item
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    assert FID_TARGET == TARGET
    tok = AutoTokenizer.from_pretrained(tiny_dirs[0])
    model = ChameleonForConditionalGeneration.from_pretrained(tiny_dirs[1], dtype=torch.float32).eval()
    _, (_, samples) = one_rank
    for i in (0, 1, 2, 3, 7):
        ids, labels, _ = samples[f"{i:09d}"]
        exp_ids, exp_labels = ref_process_item(dataset[0][i], model, tok, crop="random", seed=0, index=i)
        assert ids == exp_ids and labels == exp_labels, i


def test_two_ranks_equal_one_rank(one_rank, tiny_dirs, dataset, tmp_path):
    for rank in (0, 1):
        run_config(_cfg(tiny_dirs, dataset[1], tmp_path, splits=2, rank=rank, batch_size=2))
    manifest, samples = _merge_and_read(tmp_path)
    _, (_, single) = one_rank
    as_multiset = lambda s: Counter(json.dumps([k, v[0], v[1], v[2]["images"]]) for k, v in s.items())  # noqa: E731
    assert as_multiset(samples) == as_multiset(single)
    assert {r["rank"] for r in manifest["ranks"]} == {0, 1}


def test_rerun_after_finish_is_idempotent(tiny_dirs, dataset, tmp_path):
    cfg = _cfg(tiny_dirs, dataset[1], tmp_path)
    run_config(cfg)
    _, first = _merge_and_read(tmp_path)
    summary = run_config(cfg)
    assert summary.num_items == 0 and summary.total_ok == len(dataset[0])
    _, second = _merge_and_read(tmp_path)
    assert first == second


@pytest.mark.slow
def test_jsonl_input_and_workers(tiny_dirs, dataset, tmp_path, one_rank):
    lines = [json.dumps(it) for it in dataset[0]]
    lines.insert(5, "{not json")
    src = tmp_path / "items.jsonl"
    src.write_text("\n".join(lines) + "\n")
    summary = run_config(_cfg(tiny_dirs, src, tmp_path / "out", num_workers=1))
    assert summary.num_failed == 1 and summary.num_ok == len(dataset[0])
    assert [(e["index"], e["reason"]) for e in _errors(tmp_path / "out")] == [(5, "malformed_item")]
    _, samples = _merge_and_read(tmp_path / "out")
    _, (_, single) = one_rank
    # line numbers shift by one after the broken line; tokens are the same for text-only items
    assert samples["000000000"][0] == single["000000000"][0]
    assert samples["000000004"][0] == single["000000004"][0]


def test_jsonl_rank_parses_only_its_own_lines(tmp_path):
    from lumina.input_items import JsonLine, iter_rank_items

    src = tmp_path / "x.jsonl"
    src.write_text("".join(json.dumps({"n": i}) + "\n" for i in range(7)) + "\n")
    got = list(iter_rank_items(str(src), 3, 1))
    assert [i for i, _ in got] == [1, 4] and all(isinstance(x, JsonLine) for _, x in got)
    assert [i for i, _ in iter_rank_items(str(src), 3, 1, start=2)] == [4]


# ----------------------------------------------------------------------------------------------
# Bad items: each kind lands in the errors file with its index and reason; good items still land


@pytest.fixture(scope="module")
def bad_run(tiny_dirs, dataset, tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    good = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    good.save(d / "ok.png")
    (d / "garbage.png").write_bytes(b"this is not an image at all")
    Image.fromarray(np.random.RandomState(0).randint(0, 255, (100, 100, 3), dtype=np.uint8)).save(
        d / "trunc.png"
    )
    (d / "trunc.png").write_bytes((d / "trunc.png").read_bytes()[:2000])
    png_header_only(d / "bomb.png", 30000, 30000)
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(d / "big.png")
    ok = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}
    h, g = "human", "gpt"
    items = [
        ok,
        {
            "conversations": [{"from": h, "value": "<|image|>"}, {"from": g, "value": "x"}],
            "image": str(d / "missing.png"),
        },
        {
            "conversations": [{"from": h, "value": "<|image|>"}, {"from": g, "value": "x"}],
            "image": str(d / "garbage.png"),
        },
        {
            "conversations": [{"from": h, "value": "<|image|> <|image|>"}, {"from": g, "value": "x"}],
            "image": str(d / "ok.png"),
        },
        {"conversations": [{"from": g, "value": "x"}, {"from": h, "value": "y"}]},
        {"conversations": [{"from": h, "value": "only a question"}]},
        {
            "conversations": [{"from": h, "value": "<|image|>"}, {"from": g, "value": "x"}],
            "image": str(d / "bomb.png"),
        },
        {"conversations": [{"from": h, "value": ["not", "a", "string"]}, {"from": g, "value": "x"}]},
        {
            "conversations": [{"from": h, "value": "<|image|>"}, {"from": g, "value": "x"}],
            "image": str(d / "trunc.png"),
        },
        {
            "conversations": [{"from": h, "value": "<|image|>"}, {"from": g, "value": "x"}],
            "image": str(d / "big.png"),
        },
        {
            "conversations": [{"from": h, "value": "<|image|>"}, {"from": g, "value": "x"}],
            "image": str(d / "ok.png"),
            "id": 42,
        },
        "not an object",
    ]
    src = _write_json(d / "bad.json", items)
    out = d / "out"
    summary = run_config(_cfg(tiny_dirs, src, out, max_image_pixels=150 * 150))
    return summary, out


EXPECTED_FAILURES = {
    1: "missing_image",
    2: "unreadable_image",
    3: "image_count_mismatch",
    4: "non_alternating_roles",
    5: "nothing_to_predict",
    6: "oversize_image",  # decompression-bomb header: refused before decoding
    7: "non_string_text",
    8: "unreadable_image",  # truncated file
    9: "oversize_image",  # over --max_image_pixels
    11: "malformed_item",
}


@pytest.mark.parametrize("index,reason", sorted(EXPECTED_FAILURES.items()))
def test_bad_item_is_reported(bad_run, index, reason):
    _, out = bad_run
    entries = {e["index"]: e for e in _errors(out)}
    assert entries[index]["reason"] == reason
    assert entries[index]["source"] == "bad.json" and entries[index]["message"]


def test_bad_items_counted_and_good_items_land(bad_run):
    summary, out = bad_run
    assert summary.num_failed == len(EXPECTED_FAILURES) == summary.total_failed
    assert summary.failures_by_reason["oversize_image"] == 2
    manifest, samples = _merge_and_read(out)
    assert manifest["num_failed"] == len(EXPECTED_FAILURES)
    assert sorted(samples) == ["000000000", "000000010"] and samples["000000010"][2]["id"] == 42
    assert len(_errors(out)) == len(EXPECTED_FAILURES)


def test_everything_failing_exits_nonzero(tiny_dirs, tmp_path):
    src = _write_json(tmp_path / "all_bad.json", [{"conversations": [{"from": "human", "value": "q"}]}] * 3)
    argv = [
        "--in_filename",
        src,
        "--out_dir",
        str(tmp_path / "out"),
        "--tokenizer",
        tiny_dirs[0],
        "--vq_model",
        tiny_dirs[1],
        "--num_workers",
        "0",
        "--no_progress",
    ]
    assert pre_tokenize_main(argv) == 1
    assert len(_errors(tmp_path / "out")) == 3


def test_bad_config_is_a_clear_error(tiny_dirs, tmp_path, dataset):
    with pytest.raises(ValueError, match="--rank"):
        _cfg(tiny_dirs, dataset[1], tmp_path, splits=2, rank=2)
    with pytest.raises(ValueError, match="--target_size"):
        _cfg(tiny_dirs, dataset[1], tmp_path, target_size=100)


# ----------------------------------------------------------------------------------------------
# Resume: SIGKILL mid-run, rerun the same command, same dataset as an uninterrupted run


def _cli(in_file, out_dir, tiny):
    return killable_pretok_cmd(in_file, out_dir, tiny, TARGET)


@pytest.mark.slow
def test_sigkill_then_rerun_equals_uninterrupted(tiny_dirs, tmp_path):
    items = mixed_items(tmp_path / "images", n=24)
    items[9] = {"conversations": [{"from": "gpt", "value": "bad roles"}]}  # a failure inside the run
    src = _write_json(tmp_path / "items.json", items)
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO), os.environ.get("PYTHONPATH", "")])
    )
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    done = subprocess.run(_cli(src, clean, tiny_dirs), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    proc = subprocess.Popen(
        _cli(src, killed, tiny_dirs), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while len(list(killed.glob("*.idx.json"))) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "shard-r00000.done.json").exists()

    subprocess.run(_cli(src, killed, tiny_dirs), env=env, check=True, capture_output=True)
    m_clean, s_clean = _merge_and_read(clean)
    m_killed, s_killed = _merge_and_read(killed)
    assert s_killed == s_clean and len(s_clean) == 23
    assert _errors(killed) == _errors(clean) and [e["index"] for e in _errors(clean)] == [9]
    assert m_killed["num_failed"] == m_clean["num_failed"] == 1


# ----------------------------------------------------------------------------------------------
# Legacy import and the command line


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_convert_records(tiny_dirs, tmp_path, one_rank):
    from lumina.convert_records import convert_records

    _, (_, samples) = one_rank
    files = tmp_path / "files"
    files.mkdir()
    records = []
    for key in ("000000000", "000000001", "000000002"):
        ids, labels, _ = samples[key]
        i = int(key)
        with open(files / f"{i}.pkl", "wb") as f:
            pickle.dump({"token": ids, "label": labels, "id": i}, f)
        records.append({"file": f"files/{i}.pkl", "len": len(ids), "id": i})
    with open(files / "3.pkl", "wb") as f:
        pickle.dump(_Evil(), f)
    records.append({"file": "files/3.pkl", "len": 1, "id": 3})
    records.append({"file": "files/404.pkl", "len": 1, "id": 404})
    (tmp_path / "record.json").write_text(json.dumps(records))

    result = convert_records(str(tmp_path / "record.json"), str(tmp_path / "out"), tokenizer=tiny_dirs[0])
    assert result == {"num_records": 5, "num_samples": 3, "num_failed": 2}
    _, converted = _merge_and_read(tmp_path / "out")
    for key in ("000000000", "000000001", "000000002"):
        assert converted[key][:2] == samples[key][:2]
        assert [im["offset"] for im in converted[key][2]["images"]] == [
            im["offset"] for im in samples[key][2]["images"]
        ]
    reasons = [(e["index"], e["reason"]) for e in _errors(tmp_path / "out")]
    assert reasons == [(3, "bad_record"), (4, "bad_record")]
    assert "refusing" in _errors(tmp_path / "out")[0]["message"]


def test_cli_help():
    for argv in (
        ["--help"],
        ["pre-tokenize", "--help"],
        ["convert-records", "--help"],
        ["make-tiny", "--help"],
    ):
        out = subprocess.run(
            [sys.executable, "-m", "lumina.cli", *argv], capture_output=True, text=True, cwd=REPO
        )
        assert out.returncode == 0 and "usage: lumina" in out.stdout, argv
    out = subprocess.run(
        [sys.executable, "-m", "lumina.pre_tokenize", "--help"], capture_output=True, text=True, cwd=REPO
    )
    for flag in (
        "--splits",
        "--rank",
        "--in_filename",
        "--out_dir",
        "--target_size",
        "--tokenizer",
        "--vq_model",
        "--batch_size",
        "--precision",
        "--device",
        "--crop",
        "--max_samples_per_shard",
    ):
        assert flag in out.stdout
