"""Where a training step's time goes on CPU: waiting for data, forward+backward, optimizer.

Builds a small Chameleon (tiny tokenizer, random weights), writes two token datasets in the
format-v1 shard layout, and trains it with ``torchrun --nproc_per_node 2 -m lumina.train``
(ZeRO-3, gloo) on their mixture with the streaming loader's worker processes. The trainer's own
metrics (``metrics.jsonl``) give the split; the first log window (start-up) is left out::

    python benchmarks/bench_train.py                    # 2 ranks x 2 loader workers
    python benchmarks/bench_train.py --num_workers 0    # read in the training process
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_datasets(out: str, vocab: int, num_samples: int, min_len: int, max_len: int) -> str:
    """Two random-token datasets (``captions``, ``generation``) and a 70/30 data config."""
    import numpy as np

    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    rng = np.random.default_rng(0)
    for name in ("captions", "generation"):
        with ShardWriter(os.path.join(out, name), vocab_size=vocab, max_samples=64) as w:
            for i in range(num_samples):
                n = int(rng.integers(min_len, max_len + 1))
                ids = rng.integers(5, vocab, n)
                labels = ids.copy()
                labels[: n // 4] = -100
                w.write(f"{name}-{i:06d}", ids, labels=labels)
        merge(os.path.join(out, name))
    path = os.path.join(out, "mix.yaml")
    with open(path, "w") as fh:
        fh.write(
            textwrap.dedent("""\
            seed: 0
            datasets:
              - {name: captions, manifest: captions/index.json, weight: 0.7}
              - {name: generation, manifest: generation/index.json, weight: 0.3}
            """)
        )
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_workers", type=int, default=2, help="loader workers per rank")
    parser.add_argument("--nproc", type=int, default=2, help="training processes")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log_every", type=int, default=10)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--max_seq_len", type=int, default=512)
    parser.add_argument("--hidden_size", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--work_dir", default=None, help="default: a new temp folder")
    args = parser.parse_args(argv)

    from transformers import AutoConfig

    from lumina.tiny import build_tiny_chameleon, build_tiny_tokenizer

    work = args.work_dir or tempfile.mkdtemp(prefix="bench_train_")
    tok = build_tiny_tokenizer(os.path.join(work, "tokenizer"))
    model = build_tiny_chameleon(
        os.path.join(work, "model"),
        tok,
        hidden_size=args.hidden_size,
        intermediate_size=4 * args.hidden_size,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    vocab = AutoConfig.from_pretrained(model).vocab_size
    data = write_datasets(os.path.join(work, "data"), vocab, 512, args.max_seq_len // 2, args.max_seq_len)
    run = os.path.join(work, "run")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={args.nproc}",
        "-m",
        "lumina.train",
        "--deepspeed_config",
        os.path.join(ROOT, "ds_configs", "zero3.json"),
        "--data_config",
        data,
        "--init_from",
        model,
        "--output_dir",
        run,
        "--micro_batch_size",
        str(args.micro_batch_size),
        "--max_seq_len",
        str(args.max_seq_len),
        "--max_steps",
        str(args.steps),
        "--log_every",
        str(args.log_every),
        "--save_every",
        "0",
        "--num_workers",
        str(args.num_workers),
        "--lr",
        "1e-3",
        "--progress_bar",
        "never",
    ]
    env = dict(
        os.environ,
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        print(proc.stdout[-3000:], proc.stderr[-5000:], file=sys.stderr)
        return proc.returncode
    with open(os.path.join(run, "metrics.jsonl")) as fh:
        records = [json.loads(line) for line in fh][1:]  # the first window holds start-up
    phase = {
        k: sum(r["phase_s"].get(k, 0.0) for r in records) for k in ("data_wait_s", "fwd_bwd_s", "optimizer_s")
    }
    wall = sum(r["time_s"] for r in records)
    steps = sum(args.log_every for _ in records)
    tokens_per_s = sum(r["tokens_per_s"] * r["time_s"] for r in records) / wall
    wait_all_ranks = sum(r["data_wait_share"] * r["time_s"] for r in records) / wall
    print(
        f"\n{args.nproc} ranks x {args.num_workers} loader workers, ZeRO-3 (gloo, bf16), "
        f"Chameleon hidden {args.hidden_size} x {args.layers} layers, vocab {vocab}, "
        f"micro-batch {args.micro_batch_size}, max_seq_len {args.max_seq_len}; "
        f"{steps} steps after a {args.log_every}-step start-up window\n"
    )
    print("| phase (rank 0) | s/step | share of step |")
    print("|---|---:|---:|")
    for name, key in (
        ("waiting for data", "data_wait_s"),
        ("forward + backward", "fwd_bwd_s"),
        ("optimizer step", "optimizer_s"),
    ):
        print(f"| {name} | {phase[key] / steps:.4f} | {phase[key] / wall:.2%} |")
    other = wall - sum(phase.values())
    print(f"| other (metrics, logging) | {other / steps:.4f} | {other / wall:.2%} |")
    print(f"| **step** | {wall / steps:.4f} | 100% |")
    print(
        f"\ndata wait, mean over ranks: {wait_all_ranks:.2%} of the step (target < 2%); "
        f"{tokens_per_s:,.0f} tokens/s (all ranks)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
