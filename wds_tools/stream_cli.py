"""``wds-tools stream CONFIG``: replay exactly the batches one rank receives.

Builds the same loader the trainer builds (same config, seed, layout) for ``--rank`` of
``--world-size`` and prints one JSON line per batch: the rank step, and per sample its dataset,
key and token count. ``--resume-state`` continues from a saved loader state (a file written by
``--save-state`` or the JSON of a trainer's loader state); ``--save-state`` writes the state after
the last printed batch. Use it to answer "what did rank 3 see at step 1,200?".
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
    p.add_argument("--rank", type=int, default=0, help="data-parallel rank to replay (default 0)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument(
        "--num-workers",
        type=int,
        default=0,
        help="DataLoader workers per rank, as in training (part of the data layout)",
    )
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--batches", type=int, default=10, help="batches to print (default 10)")
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
    p.add_argument("--save-state", metavar="FILE", help="write the loader state at the end")
    p.add_argument("--resume-state", metavar="FILE", help="continue from a saved loader state")
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
    from .loader import build_loader

    if args.batches < 0 or args.from_step < 0:
        raise ValueError("--batches and --from-step must be >= 0")
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
        output="torch" if args.num_workers else "numpy",
        io_options=io_options_from_args(args),
    )
    if args.resume_state:
        with open(args.resume_state) as f:
            loader.load_state_dict(json.load(f))
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


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import standalone_main

    return standalone_main("stream", argv)


if __name__ == "__main__":
    sys.exit(main())
