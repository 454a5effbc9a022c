"""``wds-tools mix CONFIG``: dry-run a data config without reading any shard's data.

Simulates the whole run (every rank of the given layout) over ``--samples`` samples or
``--steps`` optimizer steps, reading only shard indexes (for token counts), and prints per
dataset the target share, the realized sample and token shares, the largest deviation from the
target over every prefix (the target integrated over the run, so a weight schedule is followed),
the epochs consumed and how many steps an epoch of the dataset lasts. With weight schedules, a
second table gives target vs realized shares at the schedule's points (``--window`` steps around
each), and ``--plot FILE.png`` draws target and realized shares over steps (needs matplotlib).
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
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    p.add_argument("--steps", type=int, default=None, help="simulate this many optimizer steps instead")
    p.add_argument("--window", type=int, default=20, help="steps per realized-share window (default 20)")
    p.add_argument("--plot", metavar="FILE.png", help="draw target and realized shares over steps")
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
    samples: Optional[int] = 10_000,
    batch_size: int = 8,
    world_size: int = 1,
    num_workers: int = 0,
    max_seq_len: int = 4096,
    seed: Optional[int] = None,
    *,
    grad_accum: int = 1,
    steps: Optional[int] = None,
    window: int = 20,
) -> Dict[str, Any]:
    """The report ``wds-tools mix`` prints, as a dict. ``samples``: simulate global micro-batches
    until at least that many samples; ``steps``: that many optimizer steps instead."""
    import numpy as np

    from .mixing import dataset_weights
    from .simulate import RunSimulator

    sim = RunSimulator(
        config,
        world_size=world_size,
        num_workers=num_workers,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_seq_len=max_seq_len,
        seed=seed,
    )
    cfg, plans = sim.cfg, sim.plans
    names = [p.name for p in plans]
    index = {n: i for i, n in enumerate(names)}
    D = len(plans)
    by_tokens = cfg.weight_by == "tokens"
    G = batch_size * grad_accum * world_size
    units = np.zeros(D)
    target = np.zeros(D)
    s_count, t_count = np.zeros(D, np.int64), np.zeros(D, np.int64)
    dev = np.zeros(D)
    per_step: Dict[int, np.ndarray] = {}  # step -> realized units per dataset
    n = 0
    micro = 0
    limit_micro = None if steps is None else steps * grad_accum
    for bs in sim.micro_batches():
        step = micro // grad_accum
        w = dataset_weights(cfg, plans, step)
        got = np.zeros(D)
        for b in bs:
            for d, k in zip(b["dataset"], b["lengths"].tolist()):
                i = index[d]
                u = k if by_tokens else 1
                got[i] += u
                s_count[i] += 1
                t_count[i] += k
        units += got
        target += w * got.sum()
        dev = np.maximum(dev, np.abs(units - target))
        per_step[step] = per_step.get(step, np.zeros(D)) + got
        n += sum(len(b["dataset"]) for b in bs)
        micro += 1
        if limit_micro is not None and micro >= limit_micro:
            break
        if limit_micro is None and samples is not None and n >= samples:
            break
    K = sim.num_partitions
    done_steps = micro / grad_accum
    final_w = dataset_weights(cfg, plans, max(0, int(done_steps) - 1))
    ns, nt = int(s_count.sum()) or 1, int(t_count.sum()) or 1
    state = sim.state()
    rows: List[Dict[str, Any]] = []
    for i, p in enumerate(plans):
        per_epoch = K * p.samples_per_epoch(K)  # samples of one epoch over the run's partitions
        share = s_count[i] / ns
        steps_per_epoch = per_epoch / (share * G) if share else None
        pos = [
            (s["datasets"][p.name]["reader"][0], s["datasets"][p.name]["reader"][1])
            for s in state["parts"].values()
            if s is not None and p.name in s["datasets"]
        ]
        L = p.samples_per_epoch(K)
        epochs = float(np.mean([e + q / L for e, q in pos])) if pos else 0.0
        rows.append(
            {
                "name": p.name,
                "group": p.config.group,
                # the target integrated over the run (the weight itself when fixed)
                "target_share": float(target[i] / target.sum()) if target.sum() else float(final_w[i]),
                "target_now": float(final_w[i]),
                "schedule": None if p.config.schedule is None else p.config.schedule.to_json(),
                "sample_share": float(share),
                "token_share": float(t_count[i] / nt),
                "samples": int(s_count[i]),
                "tokens": int(t_count[i]),
                "max_deviation": float(dev[i]),
                "deviation_unit": "tokens" if by_tokens else "samples",
                "epochs_consumed": epochs,
                "samples_per_epoch": per_epoch,
                "steps_per_epoch": steps_per_epoch,
                "steps_until_wrap": None if steps_per_epoch is None else steps_per_epoch * (1 - epochs % 1),
                "max_epochs": p.config.max_epochs,
                "dataset_samples": p.num_samples,
                "dataset_tokens": p.num_tokens,
            }
        )
    windows = []
    last = max(per_step) + 1 if per_step else 0
    for a in range(0, last, window):
        got = sum((per_step.get(s, np.zeros(D)) for s in range(a, min(a + window, last))), np.zeros(D))
        tw = np.mean([dataset_weights(cfg, plans, s) for s in range(a, min(a + window, last))], axis=0)
        tot = got.sum() or 1.0
        windows.append(
            {
                "start": a,
                "stop": min(a + window, last),
                "target": tw.tolist(),
                "realized": (got / tot).tolist(),
            }
        )
    return {
        "config": cfg.source,
        "weight_by": cfg.weight_by,
        "simulated_samples": n,
        "simulated_steps": done_steps,
        "ended": sim.ended,
        "batch_size": batch_size,
        "grad_accum": grad_accum,
        "global_batch": G,
        "world_size": world_size,
        "num_workers": num_workers,
        "partitions": K,
        "datasets": rows,
        "names": names,
        "windows": windows,
        "schedule_points": sorted(
            {x for p in plans if p.config.schedule is not None for x, _ in p.config.schedule.points}
        ),
    }


def _table(rep: Dict[str, Any]) -> str:
    head = (
        f"{rep['config']}: {rep['simulated_samples']} samples, {rep['simulated_steps']:g} steps of "
        f"{rep['world_size']} rank(s) x micro-batch {rep['batch_size']} x {rep['grad_accum']} "
        f"(global batch {rep['global_batch']}; {rep['partitions']} partitions; weights by "
        f"{rep['weight_by']})" + ("; the stream ended (all datasets bounded)" if rep["ended"] else "")
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
    pts = rep.get("schedule_points") or []
    if pts:
        lines.append("")
        lines.append(f"schedule points: target vs realized shares in the {len(rep['windows'])} windows")
        lines.append("  ".join(f"{c:>13}" for c in ["step", "window"] + [n[:13] for n in rep["names"]]))
        for x in pts:
            win = next((w for w in rep["windows"] if w["start"] <= x < w["stop"]), None)
            if win is None:
                continue
            cells = [f"{t:.3f}/{r:.3f}" for t, r in zip(win["target"], win["realized"])]
            lines.append("  ".join(f"{c:>13}" for c in [str(x), f"{win['start']}-{win['stop']}"] + cells))
    return "\n".join(lines)


def plot(rep: Dict[str, Any], path: str) -> None:
    """Target (dashed) and realized (solid) shares per window over steps, one colour a dataset."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError(
            "--plot needs matplotlib: pip install 'lumina-wds[plot]' (or pip install matplotlib)"
        ) from None
    fig, ax = plt.subplots(figsize=(8, 4.5))
    xs = [(w["start"] + w["stop"]) / 2 for w in rep["windows"]]
    for i, name in enumerate(rep["names"]):
        (line,) = ax.plot(xs, [w["realized"][i] for w in rep["windows"]], label=f"{name} realized")
        ax.plot(
            xs, [w["target"][i] for w in rep["windows"]], "--", color=line.get_color(), label=f"{name} target"
        )
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"share of {rep['weight_by']}")
    ax.set_ylim(0, 1)
    ax.set_title(f"{rep['config']}: global batch {rep['global_batch']}")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    for name in ("samples", "batch_size", "world_size", "max_seq_len", "grad_accum", "window"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise ValueError("--steps must be >= 1")
    if args.plot:  # fail before the simulation when matplotlib is missing
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise ValueError(
                "--plot needs matplotlib: pip install 'lumina-wds[plot]' (or pip install matplotlib)"
            ) from None
    rep = dry_run(
        args.config,
        args.samples,
        args.batch_size,
        args.world_size,
        args.num_workers,
        args.max_seq_len,
        args.seed,
        grad_accum=args.grad_accum,
        steps=args.steps,
        window=args.window,
    )
    print(json.dumps(rep, indent=1) if args.json else _table(rep))
    if args.plot:
        plot(rep, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import standalone_main

    return standalone_main("mix", argv)


if __name__ == "__main__":
    sys.exit(main())
