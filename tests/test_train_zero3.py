"""Two-process (gloo) ZeRO-3 training of a tiny Chameleon: learning, exact resume, export.

Training runs launch ``torchrun --nproc_per_node 2 -m lumina.train`` on CPU, as a user would on
GPUs, on a two-dataset mixture of format-v1 shards streamed by ``wds_tools`` (with a data-loader
worker process per rank).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from lumina_fixtures import launcher_env, tiny_tokenizer_and_model, tiny_train_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ_LEN = 24

pytestmark = pytest.mark.slow

WORKER = textwrap.dedent('''
    """Test worker: the engine's logits of a fixed batch after loading a checkpoint."""
    import sys

    import torch

    from lumina.synthetic import SyntheticLoader
    from lumina.distributed import init_distributed, shutdown_distributed
    from lumina.train import build_engine
    from lumina.train_config import parse_args

    root, tag, out, vocab, seq_len, argv = (sys.argv[1], sys.argv[2], sys.argv[3],
                                            int(sys.argv[4]), int(sys.argv[5]), sys.argv[6:])
    cfg = parse_args(argv)
    dist = init_distributed()
    engine, _ = build_engine(cfg, dist, fresh_start=False)
    engine.load_checkpoint(root, tag=tag, load_optimizer_states=False,
                           load_lr_scheduler_states=False)
    engine.eval()
    batch = SyntheticLoader(vocab, 2, seq_len, seed=123, min_len=seq_len - 8).batch(0)
    logits = engine.module.logits(batch["input_ids"], batch["attention_mask"])
    if dist.rank == 0:
        torch.save({"logits": logits, "batch": batch}, out)
    shutdown_distributed(exit_code=0)
''')


def _write_dataset(root, name, vocab, image_ids, num_samples, seed):
    """A small format-v1 dataset; 'generation' samples have image-token targets."""
    import numpy as np

    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    rng = np.random.default_rng(seed)
    out = os.path.join(root, name)
    with ShardWriter(out, vocab_size=vocab, max_samples=4) as w:
        for i in range(num_samples):
            n = int(rng.integers(SEQ_LEN - 8, SEQ_LEN + 1))
            ids = rng.integers(5, vocab, n)
            if name == "generation":  # a text prompt, then an "image" of code tokens
                ids[n // 2 :] = rng.choice(image_ids, n - n // 2)
            labels = ids.copy()
            labels[: n // 2 if name == "generation" else n // 4] = -100
            w.write(f"{name}-{i:04d}", ids, labels=labels)
    merge(out)
    return os.path.join(out, "index.json")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import AutoConfig

    from lumina.model import image_token_ids

    base = tmp_path_factory.mktemp("tiny")
    tok, model, _ = tiny_tokenizer_and_model(base)
    worker = base / "worker.py"
    worker.write_text(WORKER)
    config = AutoConfig.from_pretrained(model)
    vocab, image_ids = config.vocab_size, image_token_ids(config)
    data = base / "data"
    _write_dataset(str(data), "captions", vocab, image_ids, 8, seed=1)
    _write_dataset(str(data), "generation", vocab, image_ids, 8, seed=2)
    (data / "mix.yaml").write_text(
        textwrap.dedent("""\
        seed: 0
        weight_by: samples
        datasets:
          - {name: captions, manifest: captions/index.json, weight: 0.5}
          - {name: generation, manifest: generation/index.json, weight: 0.5}
        """)
    )
    (data / "once.yaml").write_text(
        textwrap.dedent("""\
        seed: 0
        datasets:
          - {name: captions, manifest: captions/index.json, weight: 0.5, max_epochs: 1}
          - {name: generation, manifest: generation/index.json, weight: 0.5, max_epochs: 1}
        """)
    )
    return {
        "model": model,
        "worker": str(worker),
        "base": base,
        "vocab": vocab,
        "data_config": str(data / "mix.yaml"),
        "bounded_config": str(data / "once.yaml"),
    }


def _run(cmd, out_dir):
    proc = subprocess.run(cmd, cwd=ROOT, env=launcher_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        errors = [
            line
            for line in proc.stderr.splitlines()
            if any(w in line for w in ("Error", "error:", "what()", "Traceback"))
        ]
        raise AssertionError(
            f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n"
            + "\n".join(errors[:40])
            + f"\n...\n{proc.stderr[-4000:]}"
        )
    return proc


def _common_flags(tiny, out_dir):
    return [*tiny_train_flags(tiny["model"], out_dir, SEQ_LEN), "--z_loss_weight", "1e-4"]


def _train(tiny, out_dir, *flags):
    """``torchrun --nproc_per_node 2 -m lumina.train`` on the two-dataset mixture."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "lumina.train",
        "--data_config",
        tiny["data_config"],
        *_common_flags(tiny, out_dir),
        *flags,
    ]
    return _run(cmd, out_dir)


def _engine_logits(tiny, ckpt_root, tag, dump):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        tiny["worker"],
        str(ckpt_root),
        tag,
        str(dump),
        str(tiny["vocab"]),
        str(SEQ_LEN),
        *_common_flags(tiny, dump.parent / "unused"),
    ]
    return _run(cmd, dump.parent)


def _metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as fh:
        return {r["step"]: r for r in map(json.loads, fh)}


@pytest.fixture(scope="module")
def straight(tiny):
    out = tiny["base"] / "straight"
    _train(tiny, out, "--max_steps", "8", "--save_every", "4")
    return out


def test_trains_and_learns_the_repeated_mixture(straight):
    m = _metrics(straight)
    assert sorted(m) == list(range(1, 9))
    losses = [m[s]["loss"] for s in range(1, 9)]
    assert all(torch.isfinite(torch.tensor(losses)))
    # 16 samples, 4 per step: every sample comes back every 4 steps; the model memorises them.
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2 - 0.1, losses
    last = m[8]
    assert last["grad_norm"] is not None and last["grad_norm"] > 0
    assert 0.0 <= last["padding_share"] < 0.5 and last["tokens_per_s"] > 0
    assert last["z_loss"] > 0 and last["lr"] == pytest.approx(3e-3)
    assert 0.0 <= last["data_wait_share"] < 1.0
    # Realized per-dataset samples over 8 steps x 2 ranks x 2 samples, mixed 50/50.
    samples = last["dataset_samples"]
    assert set(samples) == {"captions", "generation"} and sum(samples.values()) == 32
    assert 10 <= samples["captions"] <= 22, samples
    assert sum(last["dataset_tokens"].values()) > 0
    # Checkpoints every 4 steps and at the end; the run files the export needs.
    ckpts = sorted(os.listdir(straight / "checkpoints"))
    assert "step_00000004" in ckpts and "step_00000008" in ckpts
    assert (straight / "checkpoints" / "latest").read_text().strip() == "step_00000008"
    assert (straight / "tokenizer" / "tokenizer.json").is_file()
    assert (straight / "model" / "config.json").is_file()


def test_resume_reproduces_the_uninterrupted_run(tiny, straight):
    out = tiny["base"] / "resumed"
    # A crash after step 5: the last checkpoint is step 4, so steps 5.. are redone.
    _train(tiny, out, "--max_steps", "8", "--save_every", "4", "--stop_after", "5")
    saved = os.listdir(out / "checkpoints")
    assert "step_00000004" in saved and "step_00000005" not in saved
    proc = _train(tiny, out, "--max_steps", "8", "--save_every", "2", "--keep_last", "2")
    assert "resumed from" in proc.stdout + proc.stderr
    a, b = _metrics(straight), _metrics(out)
    for step in range(1, 9):  # same data, same weights: bit-identical losses
        assert b[step]["loss"] == a[step]["loss"], step
        assert b[step]["grad_norm"] == a[step]["grad_norm"], step
    # The per-dataset counts continue across the restart.
    assert b[8]["dataset_samples"] == a[8]["dataset_samples"]
    # keep_last=2: only the two newest remain.
    kept = sorted(d for d in os.listdir(out / "checkpoints") if d.startswith("step_"))
    assert kept == ["step_00000006", "step_00000008"]


def test_export_loads_with_from_pretrained_and_gives_the_engine_logits(tiny, straight, tmp_path):
    from transformers import AutoTokenizer, ChameleonForConditionalGeneration

    from lumina.export import main as export_main

    dump = tmp_path / "engine_logits.pt"
    _engine_logits(tiny, straight / "checkpoints", "step_00000008", dump)
    engine = torch.load(dump, weights_only=False)
    hf_dir = tmp_path / "hf"
    assert export_main(["--run_dir", str(straight), "--out", str(hf_dir)]) == 0
    model = ChameleonForConditionalGeneration.from_pretrained(str(hf_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(hf_dir))
    assert len(tok) == model.config.vocab_size
    assert model.dtype == torch.bfloat16
    batch = engine["batch"]
    with torch.no_grad():
        hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden = model.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).last_hidden_state
        unmasked = model.lm_head(hidden).float()
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(unmasked[real], engine["logits"][real], rtol=0, atol=1e-2)
    # transformers' forward equals them too, except for the image-token columns it masks.
    from lumina.model import image_token_ids

    text_cols = torch.ones(model.config.vocab_size, dtype=torch.bool)
    text_cols[image_token_ids(model.config)] = False
    torch.testing.assert_close(
        hf.float()[real][:, text_cols], engine["logits"][real][:, text_cols], rtol=0, atol=1e-2
    )
    # And the weights moved away from the starting point.
    start = ChameleonForConditionalGeneration.from_pretrained(tiny["model"])
    assert not torch.equal(start.lm_head.weight.bfloat16(), model.lm_head.weight)


def test_optimizer_offload_config_trains_like_zero3(tiny, straight):
    """ds_configs/zero3_offload.json: DeepSpeed's CPU Adam instead of torch's AdamW, same run."""
    out = tiny["base"] / "offload"
    offload = os.path.join(ROOT, "ds_configs", "zero3_offload.json")
    _train(tiny, out, "--max_steps", "3", "--save_every", "0", "--deepspeed_config", offload)
    a, b = _metrics(straight), _metrics(out)
    assert b[1]["loss"] == a[1]["loss"]  # same start, same first batch
    for step in (2, 3):
        assert b[step]["loss"] == pytest.approx(a[step]["loss"], rel=2e-3), step


def test_gpu_benchmark_runs_in_tiny_mode():
    """benchmarks/bench_train_gpu.py (run on GPUs for the docs) works end to end on CPU."""
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "benchmarks", "bench_train_gpu.py"),
            "--tiny",
            "--warmup",
            "1",
            "--steps",
            "1",
        ],
        cwd=ROOT,
        env=launcher_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| bare ZeRO-3 loop" in proc.stdout and "| lumina trainer" in proc.stdout


def test_bounded_mixture_ends_training_with_a_checkpoint(tiny):
    """One epoch of each dataset, with gradient accumulation: every sample once, then stop."""
    out = tiny["base"] / "bounded"
    proc = _train(
        tiny,
        out,
        "--data_config",
        tiny["bounded_config"],
        "--max_steps",
        "100",
        "--save_every",
        "0",
        "--grad_accum",
        "2",
    )
    assert "the data ended after step 2" in proc.stdout
    m = _metrics(out)
    assert sorted(m) == [1, 2]  # 16 samples = 2 steps x 2 micro-batches x 2 ranks x 2 samples
    assert m[2]["dataset_samples"] == {"captions": 8, "generation": 8}
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
