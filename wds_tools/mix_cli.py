"""``wds-tools mix CONFIG``: dry-run a data config without reading any shard's data.

Simulates the first reader (rank 0, worker 0) of the given layout over ``--samples`` samples,
reading only shard indexes (for token counts), and prints per dataset the target share, the
realized sample and token shares, the largest deviation from the target over every prefix,
the epochs consumed and how many steps an epoch of the dataset lasts.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List, Optional

__all__ = ["add_arguments", "run", "main", "dry_run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="data config YAML")
    p.add_argument(
        "--samples", type=int, default=10_000, help="samples to simulate for one reader (default 10000)"
    )
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size (default 8)")
    p.add_argument("--world-size", type=int, default=1, help="data-parallel ranks (default 1)")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=4096,
        help="truncation length; token counts are of truncated samples",
    )
    p.add_argument("--seed", type=int, default=None, help="override the config's seed")
    p.add_argument("--json", action="store_true", help="print one JSON document")


def dry_run(
    config: str,
    samples: int,
    batch_size: int = 8,
    world_size: int = 1,
    num_workers: int = 0,
    max_seq_len: int = 4096,
    seed: Optional[int] = None,
) -> Dict[str, Any]:
    """The report ``wds-tools mix`` prints, as a dict."""
    from . import io as wio
    from .config import resolve_data_config
    from .mixing import dataset_weights
    from .stream import Consumer, load_plans

    cfg = resolve_data_config(config)
    plans = load_plans(cfg, cfg.io_options(wio.DEFAULT))
    slots = max(1, num_workers)
    consumers = world_size * slots
    for p in plans:
        p.check_consumers(consumers)
    c = Consumer(
        plans,
        cfg,
        seed=cfg.seed if seed is None else seed,
        consumer=0,
        num_consumers=consumers,
        batch_size=batch_size,
        max_seq_len=max_seq_len,
        read_data=False,
    )
    w = dataset_weights(cfg, plans)
    unit = 1 if cfg.weight_by == "samples" else None
    dev = [0.0] * len(plans)
    n = 0
    ended = False
    while n < samples:
        nxt = c.next_samples()
        if nxt is None:
            ended = True
            break
        n += len(nxt[0])
        units = c.mixer.units
        total = sum(units)
        for i in range(len(plans)):
            dev[i] = max(dev[i], abs(units[i] - w[i] * total))
    ns, nt = sum(c.mixer.samples) or 1, sum(c.tokens) or 1
    rows: List[Dict[str, Any]] = []
    for i, p in enumerate(plans):
        per_epoch = p.samples_per_epoch(consumers)
        r = c.readers[i]
        share = c.mixer.samples[i] / ns
        steps = per_epoch / (share * batch_size) * slots if share else None
        rows.append(
            {
                "name": p.name,
                "group": p.config.group,
                "target_share": float(w[i]),
                "sample_share": share,
                "token_share": c.tokens[i] / nt,
                "samples": c.mixer.samples[i],
                "tokens": c.tokens[i],
                "max_deviation": dev[i],
                "deviation_unit": "samples" if unit else "tokens",
                "epochs_consumed": r.epoch + r.pos / per_epoch,
                "samples_per_epoch_per_reader": per_epoch,
                "steps_per_epoch": steps,
                "steps_until_wrap": None if steps is None else steps * (1 - (r.pos / per_epoch) % 1),
                "max_epochs": p.config.max_epochs,
                "dataset_samples": p.num_samples,
                "dataset_tokens": p.num_tokens,
            }
        )
    return {
        "config": cfg.source,
        "weight_by": cfg.weight_by,
        "simulated_samples": n,
        "ended": ended,
        "batch_size": batch_size,
        "world_size": world_size,
        "num_workers": num_workers,
        "readers": consumers,
        "datasets": rows,
    }


def _table(rep: Dict[str, Any]) -> str:
    head = (
        f"{rep['config']}: {rep['simulated_samples']} samples of reader 0 of {rep['readers']} "
        f"(weights by {rep['weight_by']}; steps are rank steps of {rep['batch_size']})"
        + ("; the stream ended (all datasets bounded)" if rep["ended"] else "")
    )
    cols = ["dataset", "target", "samples%", "tokens%", "max dev", "epochs", "steps/epoch", "steps to wrap"]
    lines = [head, "  ".join(f"{c:>13}" for c in cols)]
    for d in rep["datasets"]:

        def f(x, fmt):
            return "-" if x is None else format(x, fmt)

        lines.append(
            "  ".join(
                f"{x:>13}"
                for x in [
                    d["name"][:13],
                    f(d["target_share"], ".4f"),
                    f(100 * d["sample_share"], ".2f"),
                    f(100 * d["token_share"], ".2f"),
                    f(d["max_deviation"], ".1f"),
                    f(d["epochs_consumed"], ".3f"),
                    f(d["steps_per_epoch"], ".0f"),
                    f(d["steps_until_wrap"], ".0f"),
                ]
            )
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    for name in ("samples", "batch_size", "world_size", "max_seq_len"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    rep = dry_run(
        args.config,
        args.samples,
        args.batch_size,
        args.world_size,
        args.num_workers,
        args.max_seq_len,
        args.seed,
    )
    print(json.dumps(rep, indent=1) if args.json else _table(rep))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import standalone_main

    return standalone_main("mix", argv)


if __name__ == "__main__":
    sys.exit(main())
