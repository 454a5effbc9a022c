"""Reliability, crash faults: SIGKILL the pre-tokenizer and the trainer, rerun, compare with a clean run.

* pre-tokenize: one output folder is killed at several random moments in a row (each rerun
  resumes the previous killed one), then finished; the merged dataset (keys, tokens, labels,
  meta) and the errors file must equal an uninterrupted run's, with no entry twice.
* train: 2-process gloo ZeRO-3 (``torchrun -m lumina.train``, as in ``test_train_zero3.py``).
  A rank is SIGKILLed mid-step, and (through a test-only entry point, ``CRASH_ENTRY`` below, that
  wraps ``Trainer.write_checkpoint``) mid-save after rank 0 has written DeepSpeed's ``latest`` for
  the half-written tag; the rerun
  must resume from the last *complete* checkpoint and reproduce the uninterrupted run's losses
  bit for bit (same data, same order) and its per-dataset sample counts.
* checkpoint discovery on crafted folders: shards without ``latest``, ``latest`` naming a folder
  with missing or truncated files, a torn ``latest``.

Every test records its figures (``tests/reliability_log.py``).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lumina_fixtures import killable_pretok_cmd, mixed_items, tiny_tokenizer_and_model, tiny_train_flags
from reliability_log import record

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent
SEQ_LEN = 24

pytestmark = pytest.mark.reliability


# ----------------------------------------------------------------------------------------------
# Checkpoint discovery (no processes)


def _fake_ckpt(root: Path, step: int, files=("model.pt", "optim_r0.pt", "optim_r1.pt"), mark=True):
    from lumina.checkpoint import mark_complete, tag_for_step

    tag = tag_for_step(step)
    (root / tag).mkdir(parents=True, exist_ok=True)
    for name in files:
        (root / tag / name).write_bytes(b"x" * (100 + step))
    if mark:
        mark_complete(str(root), tag, step, 2)
    return tag


def test_latest_resolution_ignores_incomplete_checkpoints(tmp_path):
    from lumina.checkpoint import (
        find_latest,
        list_checkpoints,
        prune_checkpoints,
        resolve_resume,
        use_markers,
    )
    from lumina.train_config import ConfigError

    root = tmp_path / "checkpoints"
    use_markers(str(root))
    cases = 0
    # 1. Killed during the first save: shards, no marker, no `latest` -> start fresh.
    _fake_ckpt(root, 2, files=("model.pt",), mark=False)
    assert find_latest(str(root)) is None and resolve_resume("auto", str(tmp_path)) is None
    cases += 1
    # 2. Killed between the shards and `latest`: `latest` names the older, complete one.
    t4 = _fake_ckpt(root, 4)
    (root / "latest").write_text(t4)
    _fake_ckpt(root, 6, mark=False)
    assert find_latest(str(root)) == t4
    cases += 1
    # 3. `latest` names the half-written folder (rank 0 writes it after its own files only).
    (root / "latest").write_text("step_00000006")
    assert find_latest(str(root)) == t4
    cases += 1
    # 4. `latest` names a marked folder that lost a file, or holds a truncated one.
    t8 = _fake_ckpt(root, 8)
    (root / "latest").write_text(t8)
    assert find_latest(str(root)) == t8
    (root / t8 / "optim_r1.pt").unlink()
    assert find_latest(str(root)) == t4
    cases += 1
    t10 = _fake_ckpt(root, 10)
    with open(root / t10 / "model.pt", "r+b") as fh:
        fh.truncate(10)
    assert find_latest(str(root)) == t4
    cases += 1
    # 5. A torn `latest` and a torn marker.
    (root / "latest").write_text("")
    (root / t10 / "lumina_complete.json").write_text('{"tag": "step_000')
    assert find_latest(str(root)) == t4
    cases += 1
    # An explicit incomplete tag is refused; the root resolves to the newest complete one.
    with pytest.raises(ConfigError, match="incomplete"):
        resolve_resume(str(root / "step_00000006"), str(tmp_path))
    assert resolve_resume(str(root), str(tmp_path)) == (str(root), t4)
    cases += 1
    # Pruning keeps complete checkpoints (never counts half-written ones) and drops older debris.
    t12 = _fake_ckpt(root, 12)
    assert [t for _, t in list_checkpoints(str(root))] == [t4, t12]
    deleted = prune_checkpoints(str(root), 2)
    assert deleted == ["step_00000002", "step_00000006", "step_00000008", "step_00000010"]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == [t4, t12]
    cases += 1
    record(
        "crash",
        "checkpoint discovery (crafted crash leftovers)",
        injected=6,
        tried=cases,
        detected=6,
        note="half-written tags never picked as the latest",
    )


# ----------------------------------------------------------------------------------------------
# Pre-tokenizer: SIGKILL at random points


def _pretok_cli(in_file, out_dir, tiny):
    return killable_pretok_cmd(in_file, out_dir, tiny, 256)


def _read_dataset(out_dir):
    from wds_tools.merge import merge
    from wds_tools.reader import iter_samples

    manifest = merge(str(out_dir), save_path=os.path.join(out_dir, "index.json"))
    samples = [
        (s["__key__"], s["input_ids"].astype(np.int64).tolist(), s["labels"].tolist(), s["meta"])
        for s in iter_samples(os.path.join(out_dir, "index.json"))
    ]
    return manifest, samples


def _error_lines(out_dir):
    path = Path(out_dir) / "errors-r00000.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.slow
def test_pretokenize_sigkill_at_random_points_equals_clean_run(tiny_dirs, tmp_path):
    items = mixed_items(tmp_path / "images", n=17)
    items[4] = {"conversations": [{"from": "gpt", "value": "bad roles"}]}  # failures in the run
    items[13] = {"conversations": []}
    src = tmp_path / "items.json"
    src.write_text(json.dumps(items))
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    from lumina.pre_tokenize import PreTokenizeConfig, run_config

    # The clean run in-process, inline (the adapter only sleeps; workers do not change the output).
    run_config(
        PreTokenizeConfig(
            in_filename=str(src),
            out_dir=str(clean),
            tokenizer=tiny_dirs[0],
            vq_model=tiny_dirs[1],
            target_size=256,
            num_workers=0,
            batch_size=2,
            max_samples_per_shard=3,
            progress=False,
        )
    )

    # Kill points drawn over the run: after a random number of completed shards (0 = during
    # start-up or the first shard), plus a random delay into the next shard (3 items of ~0.15 s).
    # Each rerun resumes the previous killed one, so resume-of-resume is exercised too.
    n_shards = len(list(clean.glob("shard-r00000-*.idx.json")))
    rng = random.Random(int(os.environ.get("CRASH_SEED", "20261128")))
    targets = sorted(rng.sample(range(n_shards), 5))
    kills, finished_early, points = 0, 0, []
    for target in targets:
        proc = subprocess.Popen(
            _pretok_cli(src, killed, tiny_dirs), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.time() + 120
        while (
            len(list(killed.glob("shard-r00000-*.idx.json"))) < target
            and proc.poll() is None
            and time.time() < deadline
        ):
            time.sleep(0.01)
        delay = rng.uniform(0.0, 0.6)
        try:
            proc.wait(timeout=delay)
            finished_early += 1  # ran to the end before the kill: a valid rerun all the same
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            points.append(f"{target}+{delay:.2f}s")
    final = subprocess.run(_pretok_cli(src, killed, tiny_dirs), env=env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-3000:]
    assert kills >= 4, (kills, finished_early)

    m_clean, s_clean = _read_dataset(clean)
    m_killed, s_killed = _read_dataset(killed)
    keys_clean, keys_killed = [s[0] for s in s_clean], [s[0] for s in s_killed]
    lost = len(set(keys_clean) - set(keys_killed))
    duplicated = len(keys_killed) - len(set(keys_killed))
    errs_clean, errs_killed = _error_lines(clean), _error_lines(killed)
    err_idx = [e["index"] for e in errs_killed]
    dup_errors = len(err_idx) - len(set(err_idx))
    record(
        "crash",
        "pre-tokenize SIGKILL",
        injected=kills,
        tried=len(items),
        lost=lost + max(0, len(errs_clean) - len(errs_killed)),
        duplicated=duplicated + dup_errors,
        note=f"{kills} kills at random points (completed shards + delay: {', '.join(points)}); "
        f"{len(keys_clean)} samples + {len(errs_clean)} errors compared with a clean run",
    )
    assert len(s_clean) == 15 and keys_killed == keys_clean
    assert s_killed == s_clean  # tokens, labels and meta too
    assert lost == 0 and duplicated == 0 and dup_errors == 0
    assert errs_killed == errs_clean and sorted(err_idx) == [4, 13]
    assert m_killed["num_failed"] == m_clean["num_failed"] == 2
    assert m_killed["num_samples"] == m_clean["num_samples"]
    assert not list(killed.glob("*.tmp")) and not list(killed.glob("*.rewrite"))


# ----------------------------------------------------------------------------------------------
# Trainer: SIGKILL a rank mid-step and mid-save


CRASH_ENTRY = textwrap.dedent('''
    """Test-only trainer: ``crash_train.py STEP:RANK FLAGS...`` trains like ``python -m lumina.train
    FLAGS...``, except that in the save of step STEP rank RANK writes its optimizer-states file
    half (a torn ``torch.save``), waits until rank 0 has written ``latest`` for this tag (at most
    1 s), then SIGKILLs itself. The production save path knows nothing of it."""
    import os
    import signal
    import sys
    import time

    from lumina.train import Trainer, main

    KILL_STEP, KILL_RANK = (int(x) for x in sys.argv[1].split(":"))
    write_checkpoint = Trainer.write_checkpoint


    def arm(engine, root, tag):
        ce = engine.checkpoint_engine
        save = ce.save

        def save_then_die(state_dict, path):
            save(state_dict, path)
            if "optim_states" not in os.path.basename(path):
                return
            with open(path, "r+b") as fh:
                fh.truncate(os.path.getsize(path) // 2)
            deadline = time.time() + 1
            while time.time() < deadline:
                try:
                    with open(os.path.join(root, "latest")) as fh:
                        if fh.read().strip() == tag:
                            break
                except OSError:
                    pass
                time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGKILL)

        ce.save = save_then_die


    def write_then_die(self, tag, client_state):
        if (self.step, self.dist.rank) == (KILL_STEP, KILL_RANK):
            arm(self.engine, self.root, tag)
        write_checkpoint(self, tag, client_state)


    Trainer.write_checkpoint = write_then_die
    raise SystemExit(main(sys.argv[2:]))
''')


def _write_dataset(root, name, vocab, num_samples, seed):
    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    rng = np.random.default_rng(seed)
    out = os.path.join(root, name)
    with ShardWriter(out, vocab_size=vocab, max_samples=4) as w:
        for i in range(num_samples):
            n = int(rng.integers(SEQ_LEN - 8, SEQ_LEN + 1))
            ids = rng.integers(5, 200, n)  # text-range ids (no image-token targets)
            labels = ids.copy()
            labels[: n // 4] = -100
            w.write(f"{name}-{i:04d}", ids, labels=labels)
    merge(out)


@pytest.fixture(scope="module")
def tiny_train(tmp_path_factory):

    base = tmp_path_factory.mktemp("crash_train")
    tok, model, vocab = tiny_tokenizer_and_model(base)
    data = base / "data"
    _write_dataset(str(data), "a", vocab, 12, seed=1)
    _write_dataset(str(data), "b", vocab, 12, seed=2)
    (base / "crash_train.py").write_text(CRASH_ENTRY)
    (data / "mix.yaml").write_text(
        textwrap.dedent("""\
        seed: 0
        weight_by: samples
        datasets:
          - {name: a, manifest: a/index.json, weight: 0.5}
          - {name: b, manifest: b/index.json, weight: 0.5}
        """)
    )
    return {
        "model": model,
        "base": base,
        "data_config": str(data / "mix.yaml"),
        "crash_entry": str(base / "crash_train.py"),
    }


def _train_cmd(tiny, out_dir, max_steps=6, kill_in_save=None):
    """``torchrun -m lumina.train``, or with ``kill_in_save="STEP:RANK"`` the crash entry."""
    entry = ["-m", "lumina.train"] if kill_in_save is None else [tiny["crash_entry"], kill_in_save]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        *entry,
        "--data_config",
        tiny["data_config"],
        *tiny_train_flags(tiny["model"], out_dir, SEQ_LEN),
        "--max_steps",
        str(max_steps),
        "--save_every",
        "2",
        "--keep_last",
        "2",
    ]


def _env(**extra):
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")
    )
    env.update(extra)
    return env


def _run_train(tiny, out_dir, kill_in_save=None):
    proc = subprocess.run(
        _train_cmd(tiny, out_dir, kill_in_save=kill_in_save),
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc


def _check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _metrics(out_dir):
    """step -> record; a restarted run appends, so the last record of a step wins."""
    path = Path(out_dir) / "metrics.jsonl"
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())} if path.exists() else {}


def _children(pid):
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry))
    return out


def _rank_pid(launcher_pid, rank):
    for pid in _children(launcher_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and b"LOCAL_RANK=" + str(rank).encode() in env:
            return pid
    return None


@pytest.fixture(scope="module")
def clean_run(tiny_train):
    out = tiny_train["base"] / "clean"
    _check(_run_train(tiny_train, out))
    return _metrics(out)


def _compare(clean, resumed):
    """(steps compared, steps whose loss/grad norm differ, samples lost, samples duplicated)."""
    diff = [
        s
        for s in clean
        if resumed.get(s, {}).get("loss") != clean[s]["loss"]
        or resumed.get(s, {}).get("grad_norm") != clean[s]["grad_norm"]
    ]
    last = max(clean)
    want, got = clean[last]["dataset_samples"], resumed.get(last, {}).get("dataset_samples", {})
    lost = sum(max(0, want[k] - got.get(k, 0)) for k in want)
    dup = sum(max(0, got[k] - want.get(k, 0)) for k in got)
    return len(clean), diff, lost, dup


def _partial_match(clean, got):
    return [s for s in got if got[s]["loss"] != clean[s]["loss"]]


@pytest.mark.slow
def test_train_sigkill_mid_save_and_mid_step_resume_exactly(tiny_train, clean_run):
    """One output folder through three crashes, each rerun with the same command:

    1. rank 1 killed inside the first save (step 2): no `latest`, a torn optimizer file; the rerun
       must start fresh (before the fix it resumed from the torn tag and failed on every rerun);
    2. rank 1 killed inside the step-4 save: the rerun must resume from step 2;
    3. rank 1 killed during step 5 (step 4 saved): the rerun must resume from step 4 and finish.
    Every step's loss and gradient norm, and the per-dataset counts, must equal the clean run's.
    """
    from lumina.checkpoint import find_latest

    out = tiny_train["base"] / "crashes"
    root = out / "checkpoints"
    t0 = time.perf_counter()
    save_kills, rejected, save_notes = 0, 0, []
    for kill_step in (2, 4):
        proc = _run_train(tiny_train, out, kill_in_save=f"{kill_step}:1")
        assert proc.returncode != 0, proc.stdout[-2000:]
        save_kills += 1
        # The first run starts fresh; so does the second: nothing complete to resume from.
        assert "resumed from" not in proc.stdout and "step 1 loss" in proc.stdout, proc.stdout[-2000:]
        tag = f"step_{kill_step:08d}"
        latest = (root / "latest").read_text().strip() if (root / "latest").exists() else None
        assert (root / tag).is_dir() and not (root / tag / "lumina_complete.json").exists()
        want = None if kill_step == 2 else "step_00000002"
        resolved = find_latest(str(root))
        rejected += resolved != tag
        assert resolved == want  # the torn tag is never the latest
        assert _partial_match(clean_run, _metrics(out)) == []
        save_notes.append(f"step {kill_step}: `latest`={latest}, resolved {resolved}")

    # 3. Mid-step: kill rank 1 once step 4's checkpoint is complete (step 5 under way).
    proc = subprocess.Popen(
        _train_cmd(tiny_train, out),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline, victim = time.time() + 240, None
    while time.time() < deadline and proc.poll() is None:
        if (root / "step_00000004" / "lumina_complete.json").exists():
            victim = _rank_pid(proc.pid, 1)
            if victim:
                break
        time.sleep(0.02)
    assert victim is not None, "the run ended before step 5"
    os.kill(victim, signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert f"resumed from {root / 'step_00000002'} at step 2" in stdout
    logged = max(_metrics(out))
    assert logged <= 5 and find_latest(str(root)) == "step_00000004"

    final = _check(_run_train(tiny_train, out))
    assert f"resumed from {root / 'step_00000004'} at step 4" in final.stdout
    steps, diff, lost, dup = _compare(clean_run, _metrics(out))
    seconds = time.perf_counter() - t0
    record(
        "crash",
        "train SIGKILL mid-save",
        injected=save_kills,
        tried=steps,
        lost=lost,
        duplicated=dup,
        detected=rejected,
        note="rank 1 killed in a save with a torn optimizer file ("
        + "; ".join(save_notes)
        + f"); {steps - len(diff)}/{steps} step losses bit-identical",
    )
    record(
        "crash",
        "train SIGKILL mid-step",
        injected=1,
        tried=steps,
        lost=lost,
        duplicated=dup,
        note=f"rank 1 killed after step {logged} was logged, step 4 saved; resumed from step 4; "
        f"{steps - len(diff)}/{steps} step losses bit-identical; 4 runs {seconds:.0f} s",
    )
    assert diff == [] and lost == 0 and dup == 0
    kept = sorted(p.name for p in root.iterdir() if p.name.startswith("step_"))
    assert kept == ["step_00000004", "step_00000006"]  # keep_last 2; the torn leftovers are gone
    assert all((root / t / "lumina_complete.json").exists() for t in kept)
