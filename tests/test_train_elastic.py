"""Resuming the trainer under another layout (processes, micro-batch, accumulation).

* fast: the layout a checkpoint records and what a resume reads back, the words of the log line,
  clearing a tag before saving over it, reusing a conversion, ``--max_tokens`` settings.
* slow, 2-process gloo ZeRO-3 on CPU (``torchrun -m lumina.train``, as in
  ``test_train_zero3.py``), fp32 so only the reduction order differs between layouts:
  - a checkpoint written by 2 processes, loaded by 1 through DeepSpeed's universal conversion:
    fp32 master weights and both Adam moments of every parameter equal the 2-process load's;
  - the model side of a resume on 1 process with twice the accumulation (same global batch),
    then on 2 again, with a test loader whose position is layout-free: every later step's loss
    equals the uninterrupted run's within float tolerance;
  - the same through the streamed mixture (``wds_tools``), after a SIGKILL: losses, and the
    per-dataset sample counts at every step (nothing repeated or skipped).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from lumina_fixtures import (
    fp32_zero3_config,
    launcher_env,
    rank_pid,
    run_in_session,
    tiny_tokenizer_and_model,
    tiny_train_flags,
    torchrun_cmd,
    write_uniform_mixture,
)

ROOT = Path(__file__).resolve().parent.parent
SEQ_LEN = 24
STEPS = 10
# Measured (fp32, CPU, 2 -> 1 -> 2 processes at global batch 4): on the layout-free test loader
# the losses after both conversions equal the uninterrupted run's exactly and the gradient norms
# within 3.3e-16 relative (the reduction order of the norm differs); through the streamed
# mixture, whose split of a global batch over micro-batches differs between layouts, losses
# within 4.3e-8 and gradient norms within 5.3e-8 relative.
LOSS_RTOL = 1e-6
GNORM_RTOL = 1e-6

# The training worker: ``lumina.train.train`` on a loader whose position is layout-free (the
# number of samples consumed). Micro-batch m of rank r in global step s holds canonical samples
# s*G + (m*W + r)*B .. +B (G = B*A*W), so a global batch holds the same samples under any layout
# with the same G. Samples: 16 tokens, 4 unsupervised, from a fixed pool of 24 (two "datasets").
TRAIN_WORKER = textwrap.dedent("""
    import sys

    import torch

    from lumina.distributed import shutdown_distributed
    from lumina.train import train
    from lumina.train_config import parse_args


    class CanonicalLoader:
        def __init__(self, vocab, rank, world, micro, accum):
            self.vocab, self.rank, self.W, self.B, self.A = vocab, rank, world, micro, accum
            self.micro_batches = 0  # yielded by this rank

        def sample(self, g):
            gen = torch.Generator().manual_seed(g % 24)
            ids = torch.randint(5, self.vocab, (16,), generator=gen)
            labels = ids.clone()
            labels[:4] = -100
            return ids, labels, "ab"[g % 24 % 2]

        def __iter__(self):
            while True:
                step, m = divmod(self.micro_batches, self.A)
                first = step * self.B * self.A * self.W + (m * self.W + self.rank) * self.B
                rows = [self.sample(first + i) for i in range(self.B)]
                self.micro_batches += 1
                yield {
                    "input_ids": torch.stack([r[0] for r in rows]),
                    "labels": torch.stack([r[1] for r in rows]),
                    "attention_mask": torch.ones(self.B, 16, dtype=torch.long),
                    "dataset": [r[2] for r in rows],
                }

        def state_dict(self):
            steps = self.micro_batches // self.A
            return {"samples": steps * self.B * self.A * self.W}

        def gather_state_dicts(self):
            return {"ranks": [self.state_dict()]}

        def load_state_dict(self, state):
            samples = state["ranks"][0]["samples"]
            self.micro_batches = samples // (self.B * self.A * self.W) * self.A


    vocab, argv = int(sys.argv[1]), sys.argv[2:]
    cfg = parse_args(argv)
    accum = cfg.data.grad_accum or 1
    train(cfg, loader_factory=lambda cfg, rank, world, micro: CanonicalLoader(vocab, rank, world, micro, accum))
    shutdown_distributed(exit_code=0)
""")

# The dump worker loads the newest checkpoint of a run folder through the trainer (its resume path,
# converting when the process count changed) with a loader that accepts any state, then dumps
# the full fp32 master weights and Adam moments of every trainable parameter.
DUMP_WORKER = textwrap.dedent('''
    import sys

    import torch
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from lumina.distributed import init_distributed, shutdown_distributed
    from lumina.train import Trainer
    from lumina.train_config import parse_args


    class AnyState:
        """A loader that takes any saved state and yields nothing (the model side only)."""

        def __iter__(self):
            return iter(())

        def state_dict(self):
            return {}

        def gather_state_dicts(self):
            return {"ranks": []}

        def load_state_dict(self, state):
            pass


    out, argv = sys.argv[1], sys.argv[2:]
    dist = init_distributed()
    trainer = Trainer(parse_args(argv), dist, loader_factory=lambda *a: AnyState())
    trainer.resume_or_start()
    optimizer = trainer.engine.optimizer.optimizer
    settings = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    steps = [s["step"] for s in optimizer.state.values()]
    dump = {
        "step": trainer.step,
        "lr": trainer.engine.get_lr(),
        "groups": settings,
        "adam_steps": [float(s) for s in steps],
        "shared_steps": len({id(s) for s in steps}) < len(steps),
        "params": {},
    }
    for name, p in trainer.engine.module.named_parameters():
        if p.requires_grad:
            dump["params"][name] = {
                "fp32": safe_get_full_fp32_param(p).clone(),
                "exp_avg": safe_get_full_optimizer_state(p, "exp_avg").clone(),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq").clone(),
            }
    if dist.rank == 0:
        torch.save(dump, out)
    shutdown_distributed(exit_code=0)
''')


# ----------------------------------------------------------------------------------------------
# Fast: layouts, markers, conversion reuse, settings


def _tag_with_files(root: Path, tag: str, ranks: int) -> None:
    (root / tag).mkdir(parents=True, exist_ok=True)
    for r in range(ranks):
        (root / tag / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").write_bytes(b"x" * 10)


def test_saved_layout_and_the_changes_a_resume_logs(tmp_path):
    from lumina import checkpoint as ck

    root = tmp_path / "checkpoints"
    now = ck.train_layout(1, 2, 2)
    # A marker of this trainer: the whole layout, read without unpickling.
    _tag_with_files(root, "step_00000004", 2)
    ck.mark_complete(str(root), "step_00000004", 4, 2, ck.train_layout(2, 2, 1))
    saved = ck.saved_layout(str(root), "step_00000004")
    assert saved == {"world_size": 2, "micro_batch_size": 2, "grad_accum": 1}
    assert ck.layout_changes(saved, now) == ["processes 2 -> 1", "grad accumulation 1 -> 2"]
    assert ck.layout_changes(saved, ck.train_layout(2, 2, 1)) == []  # same layout: no change
    assert ck.layout_changes(saved, ck.train_layout(2, 4, 1)) == ["micro-batch 2 -> 4"]
    # An older marker knows the world size only; the rest is not compared.
    _tag_with_files(root, "step_00000002", 2)
    ck.mark_complete(str(root), "step_00000002", 2, 2)
    old = ck.saved_layout(str(root), "step_00000002")
    assert old == {"world_size": 2, "micro_batch_size": None, "grad_accum": None}
    assert ck.layout_changes(old, ck.train_layout(2, 8, 3)) == []
    assert ck.layout_changes(old, now) == ["processes 2 -> 1"]
    # No marker (a root from before markers): the model-state files say how many processes.
    _tag_with_files(root, "step_00000006", 3)
    assert ck.saved_layout(str(root), "step_00000006")["world_size"] == 3
    # The client state carries the layout too.
    state = ck.client_state(4, [{}, {}], {}, 2, ck.train_layout(2, 2, 1))
    assert state["layout"] == saved and ck.check_client_state(state, "x", None) is state


def test_saving_over_a_tag_clears_shards_of_a_larger_world_and_its_conversion(tmp_path):
    from lumina import checkpoint as ck

    root = tmp_path / "checkpoints"
    _tag_with_files(root, "step_00000004", 2)
    ck.mark_complete(str(root), "step_00000004", 4, 2)
    (root / "universal" / "step_00000004" / "zero").mkdir(parents=True)
    ck.clear_tag(str(root), "step_00000004")
    # A 1-process save into the same tag must not find rank 1's old shard beside its own.
    assert not (root / "step_00000004").exists()
    assert not (root / "universal" / "step_00000004").exists()
    # Pruning takes a tag's conversion with it.
    ck.use_markers(str(root))
    for step in (2, 4, 6):
        tag = ck.tag_for_step(step)
        _tag_with_files(root, tag, 1)
        ck.mark_complete(str(root), tag, step, 1)
        (root / "universal" / tag).mkdir(parents=True)
    (root / "universal" / "latest_universal").write_text("step_00000006")
    assert ck.prune_checkpoints(str(root), 1) == ["step_00000002", "step_00000004"]
    assert sorted(p.name for p in (root / "universal").iterdir()) == ["latest_universal", "step_00000006"]
    ck.clear_tag(str(root), "step_00000006")  # the last conversion gone: so is the folder
    assert not (root / "universal").exists()


def _converted_tag(root: Path, tag: str) -> Path:
    from lumina import checkpoint as ck

    done = root / "universal" / tag
    done.mkdir(parents=True)
    (done / ck.UNIVERSAL_MARKER_NAME).write_text(json.dumps({"source": tag}))
    return done


def test_a_finished_conversion_is_reused(tmp_path):
    from lumina import checkpoint as ck

    root = tmp_path / "checkpoints"
    done = _converted_tag(root, "step_00000002")
    assert ck.convert_to_universal(str(root), "step_00000002") == (str(done), 0.0)


@pytest.mark.slow  # ~5 s: the tool's process imports DeepSpeed
def test_a_failed_conversion_is_one_line_and_leaves_nothing(tmp_path):
    from lumina import checkpoint as ck
    from lumina.train_config import ConfigError

    root = tmp_path / "checkpoints"
    _converted_tag(root, "step_00000002")
    # A tag without DeepSpeed files: the tool fails; nothing that looks converted is left.
    (root / "step_00000004").mkdir()
    with pytest.raises(ConfigError) as err:
        ck.convert_to_universal(str(root), "step_00000004")
    msg = str(err.value)
    assert "\n" not in msg and "ds_to_universal" in msg and "step_00000004" in msg
    assert sorted(p.name for p in (root / "universal").iterdir()) == ["step_00000002"]


def test_max_tokens_flag_and_its_refusals(tmp_path):
    from lumina.train_config import ConfigError, parse_args

    base = ["--model_config", "x", "--data_config", "mix.yaml"]
    assert parse_args(base + ["--max_tokens", "512"]).data.max_tokens == 512
    assert parse_args(base).data.max_tokens is None
    with pytest.raises(ConfigError, match="--max_tokens must be > 0"):
        parse_args(base + ["--max_tokens", "0"])
    with pytest.raises(ConfigError) as err:
        parse_args(base + ["--max_tokens", "512", "--pack", "true"])
    assert "\n" not in str(err.value) and "--pack" in str(err.value)


def test_max_tokens_with_a_bounded_mixture_is_a_one_line_error(tmp_path):
    """The loader refuses a token budget on a bounded stream (ranks could end on different
    micro-batches); the trainer says so in one line naming the flag."""
    from lumina.train import wds_loader_factory
    from lumina.train_config import ConfigError, parse_args

    mix = Path(write_uniform_mixture(tmp_path, vocab=300, num_samples=4))
    bounded = tmp_path / "once.yaml"
    bounded.write_text(mix.read_text().replace("weight: 0.5}", "weight: 0.5, max_epochs: 1}"))
    cfg = parse_args(["--model_config", "x", "--data_config", str(bounded), "--max_tokens", "64"])
    with pytest.raises(ConfigError) as err:
        wds_loader_factory(cfg, 0, 1, 4)
    assert "\n" not in str(err.value) and str(err.value).startswith("--max_tokens")


# ----------------------------------------------------------------------------------------------
# Slow: 2-process runs


def _run(cmd, timeout=300):
    return run_in_session(cmd, cwd=ROOT, env=launcher_env(), timeout=timeout)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):

    base = tmp_path_factory.mktemp("elastic")
    tok, model, vocab = tiny_tokenizer_and_model(base)
    (base / "dump_worker.py").write_text(DUMP_WORKER)
    (base / "train_worker.py").write_text(TRAIN_WORKER)
    return {
        "base": base,
        "model": model,
        "vocab": vocab,
        "data_config": write_uniform_mixture(base / "data", vocab),
        "ds_config": fp32_zero3_config(base / "zero3_fp32.json"),
        "dump_worker": str(base / "dump_worker.py"),
        "train_worker": str(base / "train_worker.py"),
    }


def _flags(tiny, out_dir, *extra):
    return [
        *tiny_train_flags(tiny["model"], out_dir, SEQ_LEN),
        "--data_config",
        tiny["data_config"],
        "--deepspeed_config",
        tiny["ds_config"],
        "--save_every",
        "2",
        *extra,
    ]


def _train(tiny, nproc, out_dir, *extra):
    return _run(torchrun_cmd(nproc, "-m", "lumina.train", *_flags(tiny, out_dir, *extra)))


def _train_canonical(tiny, nproc, out_dir, *extra):
    args = [tiny["train_worker"], str(tiny["vocab"]), *_flags(tiny, out_dir, *extra)]
    return _run(torchrun_cmd(nproc, *args))


def _metrics(out_dir):
    """step -> record; a resumed run appends, so the last record of a step wins."""
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines)}


@pytest.fixture(scope="module")
def straight(tiny):
    """The uninterrupted run: 2 processes, micro-batch 2, no accumulation (global batch 4)."""
    out = tiny["base"] / "straight"
    _train(tiny, 2, out, "--max_steps", str(STEPS), "--keep_last", "0")
    return out


@pytest.mark.slow
def test_universal_load_on_one_process_restores_weights_and_adam_moments_exactly(tiny, straight, tmp_path):
    import shutil

    import torch

    run = tmp_path / "run"
    shutil.copytree(straight, run)
    for tag in ("step_00000006", "step_00000008", "step_00000010"):  # resume from step 4
        shutil.rmtree(run / "checkpoints" / tag)
    dumps = {}
    for nproc, extra in ((2, []), (1, ["--grad_accum", "2"])):
        dumps[nproc] = tmp_path / f"dump{nproc}.pt"
        proc = _run(torchrun_cmd(nproc, tiny["dump_worker"], str(dumps[nproc]), *_flags(tiny, run, *extra)))
        if nproc == 1:
            assert "processes 2 -> 1, grad accumulation 1 -> 2" in proc.stdout
            assert "universal checkpoint (converted in" in proc.stdout
    same, elastic = (torch.load(dumps[n], weights_only=False) for n in (2, 1))
    assert same["step"] == elastic["step"] == 4 and same["lr"] == elastic["lr"]
    # Each optimizer group keeps its settings (no weight decay on norms and biases).
    assert [g["weight_decay"] for g in same["groups"]] == [0.1, 0.0]
    assert elastic["groups"] == same["groups"]
    # Adam's step count: the same, and one counter per group (a shared one runs ahead).
    assert elastic["adam_steps"] == same["adam_steps"] == [4.0, 4.0]
    assert not elastic["shared_steps"] and not same["shared_steps"]
    assert same["params"].keys() == elastic["params"].keys() and len(same["params"]) > 20
    for name, states in same["params"].items():
        for key, value in states.items():
            assert torch.equal(elastic["params"][name][key], value), (name, key)
    assert any(s["exp_avg_sq"].abs().sum() > 0 for s in same["params"].values())  # moments live
    assert (run / "checkpoints" / "universal" / "step_00000004" / "lumina_universal.json").is_file()


def _compare(a: dict, b: dict, steps) -> float:
    """Assert steps ``steps`` of two runs' metrics agree; returns the worst relative loss gap."""
    worst = 0.0
    for step in steps:
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=LOSS_RTOL), step
        assert b[step]["grad_norm"] == pytest.approx(a[step]["grad_norm"], rel=GNORM_RTOL), step
        # Same samples per dataset at every step: nothing repeated, nothing skipped.
        assert b[step]["dataset_samples"] == a[step]["dataset_samples"], step
        worst = max(worst, abs(b[step]["loss"] - a[step]["loss"]) / abs(a[step]["loss"]))
    return worst


@pytest.mark.slow
def test_model_side_resume_on_one_process_then_two_continues_the_uninterrupted_losses(tiny):
    """2 processes to step 2, 1 process with twice the accumulation to step 4, 2 again to 6, on
    the layout-free test loader: the weights, master weights and Adam moments carried across both
    conversions give the uninterrupted run's losses."""
    straight, out = tiny["base"] / "canonical_straight", tiny["base"] / "canonical_elastic"
    _train_canonical(tiny, 2, straight, "--max_steps", "6")
    _train_canonical(tiny, 2, out, "--max_steps", "6", "--stop_after", "2")
    one = _train_canonical(tiny, 1, out, "--max_steps", "6", "--grad_accum", "2", "--stop_after", "4")
    assert "under another layout: processes 2 -> 1, grad accumulation 1 -> 2" in one.stdout
    two = _train_canonical(tiny, 2, out, "--max_steps", "6")
    assert "under another layout: processes 1 -> 2, grad accumulation 2 -> 1" in two.stdout
    a, b = _metrics(straight), _metrics(out)
    assert sorted(b) == list(range(1, 7))
    assert b[2]["loss"] == a[2]["loss"]  # before any change: the same run
    worst = _compare(a, b, range(3, 7))
    print(f"model side: worst relative loss difference after the resumes {worst:.2e}")


@pytest.mark.slow
def test_sigkill_then_one_process_then_two_continues_the_uninterrupted_run(tiny, straight):
    out = tiny["base"] / "elastic"
    # 1. Two processes; rank 1 SIGKILLed once a checkpoint is complete (--max_steps far away, so
    #    the kill lands mid-run whatever the machine's speed).
    cmd = torchrun_cmd(2, "-m", "lumina.train", *_flags(tiny, out, "--max_steps", "1000"))
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=launcher_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    try:
        marker = out / "checkpoints" / "step_00000002" / "lumina_complete.json"
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        victim = rank_pid(proc.pid, 1)
        assert marker.exists() and victim is not None, "the first run never reached its first checkpoint"
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=120) != 0
    finally:  # the launcher's session: rank 0 and the loader workers, whatever is left of them
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    from lumina.checkpoint import find_latest

    resumed_at = int(find_latest(str(out / "checkpoints")).split("_")[1])
    assert resumed_at in (2, 4), f"the kill landed late (latest checkpoint: step {resumed_at})"
    # 2. One process, twice the accumulation (global batch 4 still), stopped after a checkpoint.
    one = _train(
        tiny, 1, out, "--max_steps", str(STEPS), "--grad_accum", "2", "--stop_after", str(resumed_at + 2)
    )
    assert "under another layout: processes 2 -> 1, grad accumulation 1 -> 2" in one.stdout
    # 3. Two processes again, to the end.
    two = _train(tiny, 2, out, "--max_steps", str(STEPS))
    assert "under another layout: processes 1 -> 2, grad accumulation 2 -> 1" in two.stdout
    a, b = _metrics(straight), _metrics(out)
    assert sorted(b) == list(range(1, STEPS + 1))
    worst = _compare(a, b, range(resumed_at + 1, STEPS + 1))
    assert sum(b[STEPS]["dataset_samples"].values()) == 4 * STEPS
    print(f"elastic resume at step {resumed_at}: worst relative loss difference {worst:.2e}")


@pytest.mark.slow
def test_max_tokens_run_sizes_micro_batches_by_tokens(tiny):
    """``--max_tokens 40`` with 16-token samples and a row cap of 4: 2 samples per micro-batch
    (3 would be 48 positions), so 3 steps of 1 process consume 6 samples."""
    out = tiny["base"] / "max_tokens"
    _train(tiny, 1, out, "--max_steps", "3", "--micro_batch_size", "4", "--max_tokens", "40")
    m = _metrics(out)
    assert sorted(m) == [1, 2, 3]
    assert sum(m[3]["dataset_samples"].values()) == 6 and m[3]["padding_share"] == 0.0
    assert sum(m[3]["dataset_tokens"].values()) == 6 * 16
