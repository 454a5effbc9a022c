"""Pre-tokenizing at scale: raw img2dataset-style shards from HTTP/S3, several JSONL files split by
file, output to S3 (atomic objects, resume after SIGKILL), merge from S3, the SLURM launcher."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from lumina.pre_tokenize import PreTokenizeConfig, run_config

from servers import NginxServer, find_nginx

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent
DEMO = REPO / "lumina" / "assets" / "demo"
TARGET = 256
BUCKET = "wds-test"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/lumina-pwned",))


def demo_captions() -> dict:
    """Image file name -> caption, from the bundled demo (the text after the prompt line)."""
    items = json.loads((DEMO / "captions.json").read_text())
    out = {}
    for it in items:
        out.setdefault(it["image"][0], it["conversations"][0]["value"].split("prompt:\n", 1)[1])
    return out


def build_raw_corpus(folder: Path, repeat: int = 1) -> dict:
    """img2dataset-style shards of the bundled photos: ``KEY.jpg`` + ``KEY.txt`` and/or
    ``KEY.json`` (written by webdataset's TarWriter, so with pax headers), 3 shards per repeat.
    One broken JPEG and one sample without a caption per repeat; a ``.pyd`` pickle member that
    must never be decoded. Returns ``{"good": [(shard_no, key, caption)], "bad": [(shard_no,
    key, reason)], "urls": [...]}``."""
    import webdataset as wds

    folder.mkdir(parents=True, exist_ok=True)
    caps = demo_captions()
    photos = sorted(caps)
    jpg = {p: (DEMO / p).read_bytes() for p in photos}
    good, bad, names = [], [], []
    for r in range(repeat):
        plan = [
            [("txt", photos[0]), ("json", photos[1]), ("both+pyd", photos[2])],
            [("txt", photos[3]), ("broken", photos[5]), ("txt", photos[4])],
            [("txt", photos[5]), ("nocaption", photos[1])],
        ]
        for k, samples in enumerate(plan):
            shard_no = 3 * r + k
            name = f"{shard_no:05d}.tar"
            names.append(name)
            with wds.TarWriter(str(folder / name)) as tw:
                for j, (how, photo) in enumerate(samples):
                    key = f"{shard_no:05d}{j:04d}"
                    caption = caps[photo]
                    doc = {"__key__": key}
                    meta = {"key": key, "url": f"http://example.com/{photo}", "status": "success"}
                    if how == "txt":
                        doc.update(jpg=jpg[photo], txt=caption)
                    elif how == "json":
                        doc.update(jpg=jpg[photo], json=json.dumps(dict(meta, caption=caption)).encode())
                    elif how == "both+pyd":
                        doc.update(
                            jpg=jpg[photo],
                            txt=caption,
                            json=json.dumps(meta).encode(),
                            pyd=pickle.dumps(_Evil()),
                        )
                    elif how == "broken":
                        doc.update(jpg=jpg[photo][:1500], txt=caption)
                    elif how == "nocaption":
                        doc.update(jpg=jpg[photo], json=json.dumps(meta).encode())
                    tw.write(doc)
                    if how == "broken":
                        bad.append((shard_no, key, "unreadable_image"))
                    elif how == "nocaption":
                        bad.append((shard_no, key, "missing_caption"))
                    else:
                        good.append((shard_no, key, caption))
    return {"good": good, "bad": bad, "names": names}


@pytest.fixture(scope="module")
def raw_corpus(tmp_path_factory):
    www = tmp_path_factory.mktemp("raw_www")
    corpus = build_raw_corpus(www / "raw")
    corpus["www"] = www
    return corpus


def _cfg(tiny, in_filename, out_dir, **kw):
    base = dict(
        in_filename=in_filename,
        out_dir=str(out_dir),
        tokenizer=tiny[0],
        vq_model=tiny[1],
        target_size=TARGET,
        num_workers=0,
        progress=False,
        batch_size=2,
        max_samples_per_shard=2,
    )
    base.update(kw)
    return PreTokenizeConfig(**base)


# ----------------------------------------------------------------------------------------------
# Raw shard reading: grouping, members kept, resume at the byte


def test_raw_shards_group_by_key_and_resume_at_byte(raw_corpus):
    from lumina.raw_shards import SOURCE_STRIDE, iter_raw_items

    urls = [str(raw_corpus["www"] / "raw" / n) for n in raw_corpus["names"]]
    items = list(iter_raw_items(urls, 1, 0))
    assert [s.key for _, s in items] == [
        f"{s:05d}{j:04d}" for s, n in ((0, 3), (1, 3), (2, 2)) for j in range(n)
    ]
    assert [i for i, _ in items][:4] == [0, 1, 2, SOURCE_STRIDE]
    first = items[2][1]
    assert set(first.members) == {"jpg", "txt", "json"}  # the .pyd member is skipped unread
    assert not Path("/tmp/lumina-pwned").exists()
    # shard 1 of 2 ranks: rank 1 owns shard 1 only
    assert {s.shard for _, s in iter_raw_items(urls, 2, 1)} == {"00001.tar"}
    # resume inside shard 0 after its first sample, from the byte where sample 1 starts
    state = {"shard_no": 0, "position": 1, "byte": items[0][1].end}
    tail = list(iter_raw_items(urls, 1, 0, start=1, state=state))
    assert [(i, s.key, s.members) for i, s in tail] == [(i, s.key, s.members) for i, s in items[1:]]
    with pytest.raises(ValueError, match="resume state"):
        list(iter_raw_items(urls, 1, 0, start=1, state=None))


def test_missing_and_corrupt_raw_shards_are_one_error_each(tmp_path, raw_corpus):
    from lumina.raw_shards import iter_raw_items

    src = raw_corpus["www"] / "raw" / "00000.tar"
    data = src.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    items = list(iter_raw_items([str(tmp_path / "absent.tar"), str(cut)], 1, 0))
    assert items[0][1].error[0] == "missing_shard"
    assert items[-1][1].error[0] == "unreadable_shard" and all(s.error is None for _, s in items[1:-1])


def test_caption_key_and_template(raw_corpus, tiny_dirs, tmp_path):
    """--caption_key reads only that .json field; --template shapes the human turn."""
    from transformers import AutoTokenizer

    from lumina.item_processing import check_template
    from wds_tools.merge import merge
    from wds_tools.reader import iter_samples

    with pytest.raises(ValueError, match="caption"):
        check_template("Draw {w}x{h}")
    with pytest.raises(ValueError, match="only the fields"):
        check_template("{caption} {style}")
    src = str(raw_corpus["www"] / "raw" / "00000.tar")
    summary = run_config(
        _cfg(tiny_dirs, src, tmp_path, caption_key="caption", template="<{w}|{h}> {caption}")
    )
    assert (summary.num_ok, summary.failures_by_reason) == (1, {"missing_caption": 2})
    merge(str(tmp_path))
    (sample,) = list(iter_samples(str(tmp_path / "index.json")))
    image = sample["meta"]["images"][0]
    text = AutoTokenizer.from_pretrained(tiny_dirs[0]).decode(sample["input_ids"][: image["offset"]].tolist())
    caption = dict((k, c) for _, k, c in raw_corpus["good"])[sample["meta"]["id"]]
    assert f"<{image['w']}|{image['h']}> {caption}" in text and "Generate" not in text


@pytest.mark.reliability
def test_damaged_raw_shards_never_crash_the_reader(tmp_path, raw_corpus):
    """Random byte flips and cuts: every outcome is samples and at most one error per shard."""
    from lumina.raw_shards import iter_raw_items

    data = (raw_corpus["www"] / "raw" / "00000.tar").read_bytes()
    rng = random.Random(7)
    for trial in range(60):
        buf = bytearray(data[: rng.randrange(len(data) + 1)] if trial % 3 == 0 else data)
        for _ in range(rng.randrange(1, 8)):
            if buf:
                at = rng.randrange(min(len(buf), 4096) if trial % 2 else len(buf))
                buf[at] = rng.randrange(256)
        path = tmp_path / f"t{trial}.tar"
        path.write_bytes(bytes(buf))
        items = list(iter_raw_items([str(path)], 1, 0))
        assert sum(s.error is not None for _, s in items) <= 1
        assert all(s.error is None for _, s in items[:-1])


# ----------------------------------------------------------------------------------------------
# Several JSONL files: split by file, a rank never opens the files of another


def test_multi_file_jsonl_rank_opens_only_its_files(tmp_path, monkeypatch, tiny_dirs):
    from lumina.input_items import InputSpec, iter_inputs
    from wds_tools import io as wio

    for f in range(4):
        (tmp_path / f"part-{f}.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "conversations": [
                            {"from": "human", "value": f"q {f}.{i}"},
                            {"from": "gpt", "value": f"a {f}.{i}"},
                        ]
                    }
                )
                + "\n"
                for i in range(3)
            )
        )
    pattern = str(tmp_path / "part-{0..3}.jsonl")
    opened: list = []
    real = wio.open_range

    def counting(url, *a, **kw):
        opened.append(os.path.basename(url))
        return real(url, *a, **kw)

    monkeypatch.setattr(wio, "open_range", counting)
    spec = InputSpec(pattern)
    assert spec.kind == "jsonl" and spec.multi
    got = {}
    for rank in (0, 1):
        opened.clear()
        got[rank] = [(i, src) for i, _, src in iter_inputs(spec, 2, rank)]
        assert sorted(opened) == [f"part-{f}.jsonl" for f in range(rank, 4, 2)]
    assert [i for i, _ in got[1]] == [10**9, 10**9 + 1, 10**9 + 2, 3 * 10**9, 3 * 10**9 + 1, 3 * 10**9 + 2]
    # the whole pipeline (one rank) opens only its own files too, and keys name file and line
    opened.clear()
    summary = run_config(_cfg(tiny_dirs, pattern, tmp_path / "out", splits=2, rank=1))
    assert summary.num_ok == 6 and sorted(set(opened)) == ["part-1.jsonl", "part-3.jsonl"]
    from wds_tools.merge import merge
    from wds_tools.reader import iter_samples

    merge(str(tmp_path / "out"), allow_incomplete=True)
    keys = [s["__key__"] for s in iter_samples(str(tmp_path / "out" / "index.json"))]
    assert keys == [
        "000001000000000",
        "000001000000001",
        "000001000000002",
        "000003000000000",
        "000003000000001",
        "000003000000002",
    ]


# ----------------------------------------------------------------------------------------------
# Raw shards served by nginx and by moto S3 -> two ranks -> S3 output -> merge -> verify


@pytest.fixture(scope="module")
def raw_nginx(raw_corpus):
    if find_nginx() is None:
        pytest.skip("nginx is not installed (apt-get install -y nginx; CI installs it)")
    with NginxServer(str(raw_corpus["www"])) as srv:
        yield srv


def _s3_names(prefix_url: str) -> dict:
    from wds_tools.store import open_store

    return dict(open_store(prefix_url).list(""))


def _s3_errors(out: str, ranks=(0, 1)) -> list:
    from wds_tools import io as wio

    lines = []
    for r in ranks:
        lines += [json.loads(x) for x in wio.read_bytes(f"{out}/errors-r{r:05d}.jsonl").decode().splitlines()]
    return lines


def _read_all(manifest_url: str) -> list:
    from wds_tools.reader import iter_samples

    return [
        (s["__key__"], s["input_ids"].astype(np.int64).tolist(), s["labels"].tolist(), s["meta"])
        for s in iter_samples(manifest_url)
    ]


def _assert_no_partial_objects(names: dict) -> None:
    assert not [n for n in names if n.endswith(".tmp")], names
    tars = {n[: -len(".tar")] for n in names if n.endswith(".tar")}
    indexes = {n[: -len(".idx.json")] for n in names if n.endswith(".idx.json")}
    assert tars == indexes, tars ^ indexes


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.parametrize("source", ["http", "s3"])
def test_raw_shards_two_ranks_to_s3_merge_and_verify(
    source, raw_corpus, raw_nginx, s3, s3_env, tiny_dirs, tmp_path
):
    from transformers import AutoTokenizer

    from wds_tools.merge import merge

    run_id = uuid.uuid4().hex[:8]
    if source == "http":
        base = f"{raw_nginx.url}/raw"
    else:
        s3.upload_folder(str(raw_corpus["www"] / "raw"), BUCKET, f"in-{run_id}/raw")
        base = f"s3://{BUCKET}/in-{run_id}/raw"
    out = f"s3://{BUCKET}/out-{run_id}/t2i"
    summaries = [
        run_config(
            _cfg(
                tiny_dirs,
                base + "/{00000..00002}.tar",
                out,
                splits=2,
                rank=r,
                staging_dir=str(tmp_path / "stage"),
            )
        )
        for r in (0, 1)
    ]
    assert sum(s.num_ok for s in summaries) == len(raw_corpus["good"])
    manifest = merge(out)
    assert manifest["num_samples"] == len(raw_corpus["good"]) == 6
    assert manifest["num_failed"] == len(raw_corpus["bad"]) == 2
    names = _s3_names(out)
    assert "index.json" in names and {"shard-r00000.done.json", "shard-r00001.done.json"} <= set(names)
    _assert_no_partial_objects(names)
    assert not list((tmp_path / "stage").rglob("*.tar"))  # staging emptied after upload

    verify = subprocess.run(
        [sys.executable, "-m", "wds_tools.cli", "verify", f"{out}/index.json"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        cwd=REPO,
    )
    assert verify.returncode == 0, verify.stdout[-2000:] + verify.stderr[-2000:]

    errors = {(e["source"], e["id"], e["reason"]) for e in _s3_errors(out)}
    assert errors == {(f"{s:05d}.tar", key, reason) for s, key, reason in raw_corpus["bad"]}

    tok = AutoTokenizer.from_pretrained(tiny_dirs[0])
    captions = {key: cap for _, key, cap in raw_corpus["good"]}
    samples = _read_all(f"{out}/index.json")
    assert sorted(s[3]["id"] for s in samples) == sorted(captions)
    for key, ids, labels, meta in samples:
        (image,) = meta["images"]
        off, n = image["offset"], image["num_tokens"]
        text = tok.decode(ids[:off])
        prompt = f"Generate an image of {image['w']}x{image['h']} according to the following prompt:\n"
        assert prompt + captions[meta["id"]] in text, text
        assert all(lab == -100 for lab in labels[:off])  # the human turn is not trained on
        assert labels[off : off + n] == ids[off : off + n]  # the image block is (assistant turn)
        assert (
            meta["source"] == f"{meta['id'][:5]}.tar"
            and key == f"{int(meta['id'][:5]):06d}{int(meta['id'][5:]):09d}"
        )


@pytest.mark.network
def test_store_put_list_delete_and_errors_without_credentials(s3, s3_env, tmp_path, caplog):
    from wds_tools.store import S3Store, open_store

    run_id = uuid.uuid4().hex[:8]
    store = open_store(f"s3://{BUCKET}/st-{run_id}/out")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 << 20) + b"tail")
    store.part_bytes = 5 << 20  # S3's smallest part: the 5 MiB + 4 B file goes up in two parts
    store.put(str(big), "a/big.bin")
    store.put_bytes(b"{}", "x.json")
    assert list(store.list("")) == [("a/big.bin", (5 << 20) + 4), ("x.json", 2)]
    assert store.read_bytes("a/big.bin") == big.read_bytes()
    store.delete("x.json")
    store.delete("x.json")  # absent: no error
    assert [n for n, _ in store.list("")] == ["a/big.bin"]
    missing = S3Store(f"s3://no-such-bucket-{run_id}/p")
    with pytest.raises(OSError) as e:
        missing.put_bytes(b"x", "y")
    shown = str(e.value) + caplog.text
    assert "no-such-bucket" in shown
    for secret in (os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_SESSION_TOKEN"]):
        assert secret not in shown


# ----------------------------------------------------------------------------------------------
# SIGKILL a rank mid-shard with S3 output; the rerun resumes from what was uploaded


def _pretok_cli(pattern, out, stage, tiny, rank):
    return [
        sys.executable,
        "-m",
        "lumina.pre_tokenize",
        "--in_filename",
        pattern,
        "--out_dir",
        out,
        "--staging_dir",
        str(stage),
        "--splits",
        "2",
        "--rank",
        str(rank),
        "--tokenizer",
        tiny[0],
        "--vq_model",
        tiny[1],
        "--target_size",
        str(TARGET),
        "--num_workers",
        "1",
        "--batch_size",
        "2",
        "--max_samples_per_shard",
        "2",
        "--no_progress",
        "--adapter",
        "lumina_fixtures:slow_adapter",
    ]


@pytest.mark.network
@pytest.mark.slow
@pytest.mark.reliability
def test_sigkill_rank_with_s3_output_then_rerun_equals_clean(s3, s3_env, tiny_dirs, tmp_path):
    from wds_tools.merge import merge

    corpus = build_raw_corpus(tmp_path / "raw", repeat=4)  # rank 1: 6 shards, 16 samples
    pattern = str(tmp_path / "raw" / "{00000..00011}.tar")
    run_id = uuid.uuid4().hex[:8]
    clean, killed = f"s3://{BUCKET}/clean-{run_id}", f"s3://{BUCKET}/killed-{run_id}"
    for rank in (0, 1):
        run_config(_cfg(tiny_dirs, pattern, clean, splits=2, rank=rank, staging_dir=str(tmp_path / "s0")))
    run_config(_cfg(tiny_dirs, pattern, killed, splits=2, rank=0, staging_dir=str(tmp_path / "s1")))

    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(REPO), os.environ.get("PYTHONPATH", "")]),
    )
    cli = _pretok_cli(pattern, killed, tmp_path / "s2", tiny_dirs, rank=1)
    proc = subprocess.Popen(cli, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20261128")))
    deadline = time.time() + 180
    while (
        sum(n.startswith("shard-r00001-") and n.endswith(".idx.json") for n in _s3_names(killed)) < 1
        and proc.poll() is None
        and time.time() < deadline
    ):
        time.sleep(0.05)
    time.sleep(rng.uniform(0.02, 0.2))  # into the next shard (2 items of ~0.15 s each)
    assert proc.poll() is None, (
        "rank 1 finished before it could be killed: " + proc.stderr.read().decode()[-2000:]
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    names = _s3_names(killed)
    assert "shard-r00001.done.json" not in names and "errors-r00001.jsonl" not in names
    done_before = {n for n in names if n.startswith("shard-r00001-") and n.endswith(".idx.json")}
    assert len(done_before) < len(
        [n for n in _s3_names(clean) if n.startswith("shard-r00001-") and n.endswith(".idx.json")]
    )  # killed before the end

    rerun = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming at input index" in rerun.stderr
    assert os.environ["AWS_SECRET_ACCESS_KEY"] not in rerun.stderr
    m_clean, m_killed = merge(clean), merge(killed)
    assert _read_all(f"{killed}/index.json") == _read_all(f"{clean}/index.json")
    assert m_killed["num_samples"] == m_clean["num_samples"] == len(corpus["good"]) == 24
    assert m_killed["num_failed"] == m_clean["num_failed"] == len(corpus["bad"]) == 8
    assert sorted(map(json.dumps, _s3_errors(killed))) == sorted(map(json.dumps, _s3_errors(clean)))
    names = _s3_names(killed)
    _assert_no_partial_objects(names)
    assert done_before <= set(names)  # committed shards were kept, not redone
    from wds_tools.store import open_store

    assert open_store(killed).abort_uploads("") == 0  # no unfinished multipart upload either


# ----------------------------------------------------------------------------------------------
# The SLURM launcher, with srun replaced by a stub that starts the tasks here

SRUN_STUB = """#!/usr/bin/env bash
# stand-in for srun: drop its options, start SLURM_NTASKS copies of the command with the
# variables a real srun sets per task
echo "$@" >> "$STUB_LOG"
while [[ $# -gt 0 && "$1" == -* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" > "$STUB_LOGS/task-$i.log" 2>&1 &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""


def test_srun_script_passes_bash_n():
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "srun_pre_tokenize.sh")]).returncode == 0


@pytest.mark.slow
def test_srun_script_with_stub_runs_tasks_merges_and_requeues(tiny_dirs, tmp_path):
    from wds_tools.reader import iter_samples

    for f in range(4):
        (tmp_path / f"part-{f}.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "conversations": [
                            {"from": "human", "value": f"q {f}.{i}"},
                            {"from": "gpt", "value": f"a {f}.{i}"},
                        ]
                    }
                )
                + "\n"
                for i in range(2)
            )
        )
    bin_dir, logs = tmp_path / "bin", tmp_path / "logs"
    bin_dir.mkdir()
    logs.mkdir()
    (bin_dir / "srun").write_text(SRUN_STUB)
    (bin_dir / "srun").chmod(stat.S_IRWXU)
    out = tmp_path / "out"
    env = dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SLURM_NTASKS="2",
        SLURM_JOB_ID="42",
        SLURM_SUBMIT_DIR=str(REPO),
        PYTHON=sys.executable,
        PRETOK_DEVICE="cpu",
        STUB_LOG=str(tmp_path / "srun.log"),
        STUB_LOGS=str(logs),
        OMP_NUM_THREADS="1",
        STAGING_DIR=str(tmp_path / "stage"),
    )
    cmd = [
        "bash",
        str(REPO / "scripts" / "srun_pre_tokenize.sh"),
        "--in_filename",
        str(tmp_path / "part-{0..3}.jsonl"),
        "--out_dir",
        str(out),
        "--tokenizer",
        tiny_dirs[0],
        "--vq_model",
        tiny_dirs[1],
        "--target_size",
        str(TARGET),
        "--num_workers",
        "0",
    ]
    first = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-3000:] + "".join(
        p.read_text()[-1500:] for p in logs.iterdir()
    )
    manifest = json.loads((out / "index.json").read_text())
    assert manifest["num_samples"] == 8 and [r["rank"] for r in manifest["ranks"]] == [0, 1]
    keys = sorted(s["__key__"] for s in iter_samples(str(out / "index.json")))
    assert keys == sorted(f"{f:06d}{i:09d}" for f in range(4) for i in range(2))
    assert "--kill-on-bad-exit=0" in (tmp_path / "srun.log").read_text()
    for r in (0, 1):  # each task got its rank from SLURM_PROCID and the split from SLURM_NTASKS
        summary = json.loads((out / f"summary-r{r:05d}.json").read_text())
        assert (summary["rank"], summary["splits"], summary["num_ok"]) == (r, 2, 4)
    # requeue: the same command again resumes every task (nothing redone) and merges again
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "summary-r00001.json").read_text())["num_items"] == 0
    assert json.loads((out / "index.json").read_text())["shards"] == manifest["shards"]
    # no SLURM allocation: a clear refusal
    bad = subprocess.run(
        cmd, env={k: v for k, v in env.items() if k != "SLURM_NTASKS"}, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "sbatch" in bad.stderr
