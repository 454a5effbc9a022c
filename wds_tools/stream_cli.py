"""``wds-tools stream CONFIG``: replay exactly the batches a run receives.

Without ``--rank``: the whole run. Every rank of the layout (``--world-size`` ranks of
``--num-workers`` workers, micro-batch ``--batch-size``, ``--grad-accum`` micro-batches per
optimizer step) for ``--steps`` global steps, one JSON line per (step, rank, micro-batch):
``{"step", "rank", "micro", "samples": [{"dataset", "key", "epoch", "tokens"}, ...]}``. Only shard
indexes are read. ``--save-state FILE`` writes the run's state after the last step;
``--resume-state FILE`` continues from one under the layout and config given now (any layout).

With ``--rank R``: the batches one rank receives, read and collated as in training, one line per
batch (the rank step, per sample its dataset, key and token count), ``--batches`` of them.
Use it to answer "what did rank 3 see at step 1,200?".
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

import numpy as np

from .cli_options import add_io_arguments, io_options_from_args

__all__ = ["add_arguments", "run", "main", "batch_record"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="data config YAML, or a dataset manifest (index.json)")
    p.add_argument(
        "--rank", type=int, default=None, help="replay one data-parallel rank (default: the whole run)"
    )
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader workers per rank, as in training (part of the data layout)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--batches", type=int, default=None, help="with --rank: batches to print (default 10)")
    p.add_argument("--steps", type=int, default=10, help="whole run: global steps to print (default 10)")
    p.add_argument(
        "--grad-accum",
        type=int,
        default=1,
        help="micro-batches per optimizer step, as in training (default 1)",
    )
    p.add_argument("--partitions", type=int, default=None, help="canonical partitions of a new run")
    p.add_argument(
        "--from-step",
        type=int,
        default=0,
        help="print only from this rank step on (earlier batches are still computed)",
    )
    p.add_argument("--max-seq-len", type=int, default=4096, help="truncation length (default 4096)")
    p.add_argument("--pad-id", type=int, default=0, help="input id of padding (default 0)")
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--pack", action="store_true", help="pack samples into rows, as in training")
    p.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        metavar="N",
        help="token-budget micro-batches, as in training: rows x longest row <= N "
        "(--batch-size caps the rows)",
    )
    p.add_argument(
        "--transfer-batches", type=int, default=4, help="batches per worker turn, as in training (default 4)"
    )
    p.add_argument("--save-state", metavar="FILE", help="write the loader (run) state at the end")
    p.add_argument(
        "--resume-state", metavar="FILE", help="continue from a saved loader or run state (any layout)"
    )
    p.add_argument("--output", metavar="FILE", help="write the JSON lines here (default stdout)")
    add_io_arguments(p)


def batch_record(step: int, rank: int, batch: Dict[str, Any]) -> Dict[str, Any]:
    """The JSON line of one batch."""
    mask = np.asarray(batch["attention_mask"])  # torch tensors and numpy arrays alike
    rec: Dict[str, Any] = {"step": step, "rank": rank, "shape": list(mask.shape)}
    if "segment_ids" in batch:  # packed: token counts per sample from the segment ids
        seg = np.asarray(batch["segment_ids"])
        counts = [int(n) for r in range(seg.shape[0]) for n in np.bincount(seg[r])[1:].tolist() if n]
    else:
        counts = mask.sum(axis=1).tolist()
    rec["samples"] = [
        {"dataset": d, "key": k, "tokens": int(n)}
        for d, k, n in zip(batch["dataset"], batch["__key__"], counts)
    ]
    rec["tokens"] = int(mask.sum())
    rec["padding"] = int(mask.size - rec["tokens"])
    return rec


def run(args: argparse.Namespace) -> int:
    if args.rank is None and (args.batches is not None or args.from_step):
        raise ValueError(
            "--batches and --from-step replay one rank: give --rank R (or --steps N for the whole run)"
        )
    if args.batches is None:
        args.batches = 10
    if args.batches < 0 or args.from_step < 0 or args.steps < 0:
        raise ValueError("--batches, --steps and --from-step must be >= 0")
    state = None
    if args.resume_state:
        with open(args.resume_state) as f:
            state = json.load(f)
    if args.rank is None:
        return _whole_run(args, state)
    from .loader import build_loader

    # without workers the replay runs on numpy alone (no torch needed)
    loader = build_loader(
        args.config,
        rank=args.rank,
        world_size=args.world_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        max_seq_len=args.max_seq_len,
        pad_id=args.pad_id,
        seed=args.seed,
        pack=args.pack,
        transfer_batches=args.transfer_batches,
        max_tokens=args.max_tokens,
        grad_accum=args.grad_accum,
        partitions=args.partitions,
        output="torch" if args.num_workers else "numpy",
        io_options=io_options_from_args(args),
    )
    if state is not None:
        loader.load_state_dict(state)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        step, printed = loader.batches_delivered, 0
        if args.batches:
            for batch in loader:
                if step >= args.from_step:
                    out.write(json.dumps(batch_record(step, args.rank, batch)) + "\n")
                    printed += 1
                step += 1
                if printed >= args.batches:
                    break
        out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if args.save_state:
        with open(args.save_state, "w") as f:
            json.dump(loader.state_dict(), f)
    return 0


def _whole_run(args: argparse.Namespace, state: Optional[Dict[str, Any]]) -> int:
    from .simulate import RunSimulator

    sim = RunSimulator(
        args.config,
        world_size=args.world_size,
        num_workers=args.num_workers,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_seq_len=args.max_seq_len,
        pad_id=args.pad_id,
        seed=args.seed,
        pack=args.pack,
        max_tokens=args.max_tokens,
        transfer_batches=args.transfer_batches,
        partitions=args.partitions,
        state=state,
        io_options=io_options_from_args(args),
    )
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for step, rank, micro, b in sim.steps(args.steps):
            rec = {
                "step": step,
                "rank": rank,
                "micro": micro,
                "samples": [
                    {"dataset": d, "key": k, "epoch": e, "tokens": int(n)}
                    for d, k, e, n in zip(b["dataset"], b["__key__"], b["epoch"], b["lengths"].tolist())
                ],
            }
            out.write(json.dumps(rec) + "\n")
        out.flush()
    finally:
        if out is not sys.stdout:
            out.close()
    if sim.ended:
        print(f"the stream ended at step {sim.step} (every dataset bounded)", file=sys.stderr)
    if args.save_state:
        with open(args.save_state, "w") as f:
            json.dump(sim.state(), f)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import standalone_main

    return standalone_main("stream", argv)


if __name__ == "__main__":
    sys.exit(main())
