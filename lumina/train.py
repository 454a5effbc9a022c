"""DeepSpeed ZeRO-3 trainer of Chameleon (Lumina-mGPT) on the streamed token mixture.

Launch it the way DeepSpeed jobs are launched; all of these run the same code::

    deepspeed lumina/train.py --deepspeed_config ds_configs/zero3.json --data_config mix.yaml \
        --init_from MODEL --output_dir out ...
    deepspeed --module lumina.train ...
    torchrun --nproc_per_node 8 -m lumina.train ...
    python -m lumina.train ...                      # one process
    srun ... python -m lumina.train ...             # see scripts/srun_train.sh

CPU runs use gloo, GPU runs NCCL (DeepSpeed's accelerator picks). The loop is thin: the model and
loss live in :mod:`lumina.model` / :mod:`lumina.loss`, checkpoints in :mod:`lumina.checkpoint`,
the settings in :mod:`lumina.train_config`, the data in ``wds_tools``. Metrics stay on the device
(or the host, when they come from the CPU batch) and are reduced every ``--log_every`` steps: that
is the only host sync the loop adds.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import socket
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence

if TYPE_CHECKING:
    import torch

if __package__ in (None, ""):  # run as a file (`deepspeed lumina/train.py`): import as a package
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lumina import checkpoint as ckpt_lib
from lumina.train_config import ConfigError, TrainConfig, build_parser, config_from_namespace, \
    load_deepspeed_json, resolve_deepspeed_config

__all__ = ["DistInfo", "add_arguments", "run", "LoaderFactory", "build_engine", "init_distributed", "lr_lambda", "main", "shutdown_distributed",
           "train", "wds_loader_factory"]

log = logging.getLogger("lumina.train")

# (config, rank, world_size, micro_batch_size) -> an iterable of batches with
# state_dict()/load_state_dict(), following the wds_tools.loader contract.
LoaderFactory = Callable[[TrainConfig, int, int, int], Iterable[dict]]


class DistInfo:
    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device) -> None:
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed() -> DistInfo:
    """Join (or, alone, create) the process group; the backend follows the accelerator."""
    import torch
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:  # srun without a launcher
        env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    if "RANK" not in env:  # a single plain process
        env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
        env.setdefault("MASTER_ADDR", "127.0.0.1")
        env.setdefault("MASTER_PORT", str(_free_port()))
    local_rank = int(env.get("LOCAL_RANK", "0"))
    acc = get_accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(local_rank)
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name())
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    device = torch.device(acc.device_name(local_rank) if acc.device_name() != "cpu" else "cpu")
    return DistInfo(rank, world, local_rank, device)


def shutdown_distributed(exit_code: Optional[int] = None) -> None:
    """Barrier, destroy the process group and, given ``exit_code``, end the process at once.

    Ending with ``os._exit`` skips the C++ static destructors: with torch 2.13 + DeepSpeed 0.19 on
    gloo, a normal interpreter exit aborted now and then ("terminate called without an active
    exception", SIGABRT, exit -6) after all work was done and saved, failing the whole launch.
    """
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if exit_code is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(exit_code)


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Multiplier of the peak LR at optimizer step ``s``: linear warm-up, then constant or cosine."""
    warmup, total = cfg.optim.warmup_steps, cfg.ckpt.max_steps
    schedule, floor = cfg.optim.lr_schedule, cfg.optim.min_lr_ratio

    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def build_engine(cfg: TrainConfig, dist: DistInfo, fresh_start: bool = True) -> tuple[Any, dict]:
    """The DeepSpeed engine around :class:`lumina.model.LuminaChameleon`, and the resolved config."""
    import torch
    import deepspeed

    from lumina.model import build_model, optimizer_groups

    ds = resolve_deepspeed_config(load_deepspeed_json(cfg.deepspeed_config), cfg.data, cfg.optim,
                                  dist.world_size)
    torch.manual_seed(cfg.data.seed)
    model, handle = build_model(cfg.model, cfg.loss, ds, rank=dist.rank, zero_image_rows=fresh_start)
    groups = optimizer_groups(model, cfg.optim.weight_decay)
    fn = lr_lambda(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=groups, config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn),
    )
    del handle  # deepspeed.initialize has read it; the engine holds the config now
    return engine, ds


def wds_loader_factory(cfg: TrainConfig, rank: int, world_size: int, micro_batch_size: int):
    """The streamed WebDataset mixture of ``--data_config`` (wds_tools)."""
    from wds_tools.config import load_data_config
    from wds_tools.loader import build_loader

    if not cfg.data.data_config:
        raise ConfigError("--data_config is required (a data config YAML)")
    data_config = load_data_config(cfg.data.data_config)
    return build_loader(data_config, rank=rank, world_size=world_size, batch_size=micro_batch_size,
                        num_workers=cfg.data.num_workers, max_seq_len=cfg.data.max_seq_len,
                        pad_id=cfg.data.pad_id, seed=cfg.data.seed)


def _device_inputs(batch: dict, positions: Any, device: Any) -> dict:
    """The model inputs on ``device``; pinned, asynchronous copies on GPUs.

    The attention mask is dropped for right-padded batches (the loader's layout): under a causal
    mask a real token never attends to the padding after it, so the result at every supervised
    position is the same, and attention takes its fused ``is_causal`` path, with no mask tensor
    and no check of it on the device (transformers checks an all-ones mask with a host sync).
    """
    mask = batch["attention_mask"]
    right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())  # CPU tensor: no device sync
    pin = device.type == "cuda"

    def move(t):
        return (t.pin_memory() if pin else t).to(device, non_blocking=pin)

    return {"input_ids": move(batch["input_ids"]), "labels": move(batch["labels"]),
            "attention_mask": None if right_padded else move(mask),
            "positions": move(positions)}


class _Meter:
    """Per-window accumulators: device tensors for the loss, host numbers for the batch stats."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        import torch
        self.dev = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, ce_sum, z_sum
        self.host = Counter()
        self.samples: Counter = Counter()
        self.tokens: Counter = Counter()
        self.t0 = time.perf_counter()

    def add_batch(self, batch: dict, wait_s: float) -> None:
        mask = batch["attention_mask"]
        real = mask.sum(dim=1).tolist()  # CPU tensor: no device sync
        self.host["micro_batches"] += 1
        self.host["real_tokens"] += sum(real)
        self.host["slot_tokens"] += mask.numel()
        self.host["data_wait_s"] += wait_s
        for name, n in zip(batch.get("dataset", ["?"] * len(real)), real):
            self.samples[name] += 1
            self.tokens[name] += n

    def add_loss(self, out: Any) -> None:
        import torch
        self.dev += torch.stack([out.loss.detach().double(), out.ce_sum.double(), out.z_sum.double()])
        self.host["supervised_tokens"] += out.num_tokens


def _gather_host(obj: Any, world: int) -> list:
    import torch
    if world == 1:
        return [obj]
    out: list = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _logger_sinks(cfg: TrainConfig, dist: DistInfo, initial: int):
    """Rank 0's TensorBoard writer and progress bar (either may be None)."""
    if not dist.is_main:
        return None, None
    writer = None
    if cfg.log.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(os.path.join(cfg.ckpt.output_dir, "tb"))
        except ImportError:
            log.info("tensorboard is not installed; metrics go to metrics.jsonl only")
    bar = None
    show = cfg.log.progress_bar == "always" or (cfg.log.progress_bar == "auto" and sys.stderr.isatty())
    if show:
        from tqdm import tqdm

        bar = tqdm(total=cfg.ckpt.max_steps, initial=initial, desc="train", dynamic_ncols=True)
    return writer, bar


def _write_run_files(cfg: TrainConfig, engine: Any) -> None:
    out = cfg.ckpt.output_dir
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "trainer_meta.json"), "w") as fh:
        json.dump({"config": cfg.to_dict()}, fh, indent=2)
    engine.module.chameleon.config.save_pretrained(os.path.join(out, "model"))
    m = cfg.model
    src = m.init_from or m.model_config
    base = src if src and os.path.isdir(src) else os.path.dirname(src or "")
    found = ckpt_lib.copy_tokenizer(
        [m.tokenizer, m.init_from, os.path.join(os.path.dirname(base.rstrip("/")), "tokenizer")],
        os.path.join(out, "tokenizer"))
    if found is None:
        log.warning("no tokenizer found (set --tokenizer); exports will not hold one")


def train(cfg: TrainConfig, loader_factory: Optional[LoaderFactory] = None,
          sync_timing: bool = False) -> list[dict]:
    """Run (or continue) training; returns the metric records rank 0 logged (others: ``[]``).

    ``loader_factory`` defaults to :func:`wds_loader_factory`; ``sync_timing`` synchronises the
    device around each phase so the recorded times split exactly (benchmarks only).
    """
    import torch
    from deepspeed.accelerator import get_accelerator

    from lumina.loss import supervised_positions

    dist = init_distributed()
    loader_factory = loader_factory or wds_loader_factory
    resume = ckpt_lib.resolve_resume(cfg.ckpt.resume, cfg.ckpt.output_dir)
    engine, ds = build_engine(cfg, dist, fresh_start=resume is None)
    micro, accum = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    loader = loader_factory(cfg, dist.rank, dist.world_size, micro)

    step, counts = 0, {"samples": Counter(), "tokens": Counter()}
    if resume is not None:
        path, state = engine.load_checkpoint(resume[0], tag=resume[1])
        if path is None:
            raise ConfigError(f"--resume: could not load the checkpoint {os.path.join(*resume)}")
        if state.get("world_size") != dist.world_size:
            raise ConfigError(f"the checkpoint {path} was written by {state.get('world_size')} ranks, "
                              f"this run has {dist.world_size}: the loader positions are per rank")
        step = int(state["step"])
        loader.load_state_dict(state["loader_states"][dist.rank])
        counts = {k: Counter(v) for k, v in state.get("data_counts", counts).items()}
        if dist.is_main:
            print(f"resumed from {os.path.join(*resume)} at step {step}", flush=True)
    elif dist.is_main:
        _write_run_files(cfg, engine)
        ckpt_lib.use_markers(ckpt_lib.checkpoint_root(cfg.ckpt.output_dir))

    acc = get_accelerator()
    sync = acc.synchronize if sync_timing else (lambda: None)
    mask_image = cfg.loss.mask_image_logits
    image_ids = engine.module.image_ids.cpu() if mask_image else None
    meter = _Meter(dist.device)
    phase = Counter()
    writer, bar = _logger_sinks(cfg, dist, step)
    records: list[dict] = []
    root = ckpt_lib.checkpoint_root(cfg.ckpt.output_dir)
    last_saved = step if resume is not None else -1
    batches: Iterator[dict] = iter(loader)
    engine.train()
    stop_at = min(cfg.ckpt.max_steps, cfg.ckpt.stop_after or cfg.ckpt.max_steps)
    exhausted = False
    while step < stop_at:
        # Dropout masks depend on (seed, step, rank) only, so a resumed run draws the same ones.
        torch.manual_seed(cfg.data.seed * 1_000_003 + step * dist.world_size + dist.rank)
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(batches, None)  # every rank yields the same number of batches
            if batch is None:
                exhausted = True
                break
            wait = time.perf_counter() - t0
            meter.add_batch(batch, wait)
            labels = batch["labels"]
            if mask_image and torch.isin(labels, image_ids).any():
                raise ConfigError("--mask_image_logits is set but a batch has image-token targets "
                                  "(their loss would be infinite); unset it to train generation")
            positions = supervised_positions(labels)  # on the CPU copy: no device sync
            t1 = time.perf_counter()
            out = engine(**_device_inputs(batch, positions, dist.device))
            engine.backward(out.loss)
            sync()
            t2 = time.perf_counter()
            engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
            sync()
            t3 = time.perf_counter()
            meter.add_loss(out)
            phase["data_wait_s"] += wait
            phase["fwd_bwd_s"] += t2 - t1
            phase["optimizer_s"] += t3 - t2
        if exhausted:  # a bounded mixture ended; a partial accumulation is dropped
            if dist.is_main:
                print(f"the data ended after step {step}; stopping", flush=True)
            break
        step += 1
        if bar is not None:
            bar.update(1)
        if step % cfg.log.log_every == 0 or step == stop_at:
            record = _reduce_and_log(cfg, dist, engine, meter, counts, step, phase)
            if dist.is_main:
                records.append(record)
                _emit(cfg, record, writer, bar)
            meter.reset()
            phase = Counter()
        if (cfg.ckpt.save_every and step % cfg.ckpt.save_every == 0) or step == cfg.ckpt.max_steps:
            if step != last_saved:
                _save(cfg, dist, engine, loader, counts, step, root)
                last_saved = step
    if exhausted and step != last_saved and step > 0:
        _save(cfg, dist, engine, loader, counts, step, root)
    if cfg.ckpt.stop_after is not None and step == cfg.ckpt.stop_after < cfg.ckpt.max_steps \
            and dist.is_main:
        print(f"stopped at step {step} (--stop_after), as if killed; rerun to resume", flush=True)
    if bar is not None:
        bar.close()
    if writer is not None:
        writer.close()
    return records


def _reduce_and_log(cfg: TrainConfig, dist: DistInfo, engine: Any, meter: _Meter, counts: dict,
                    step: int, phase: Counter) -> dict:
    """One all-reduce of the device sums, one gather of the host stats (log steps only)."""
    import torch
    sums = meter.dev.clone()
    if dist.world_size > 1:
        torch.distributed.all_reduce(sums)
    host = _gather_host({"h": dict(meter.host), "s": dict(meter.samples), "t": dict(meter.tokens)},
                        dist.world_size)
    loss_sum, ce_sum, z_sum = sums.tolist()
    tot = Counter()
    for h in host:
        tot.update(h["h"])
        counts["samples"].update(h["s"])
        counts["tokens"].update(h["t"])
    elapsed = time.perf_counter() - meter.t0
    n_sup = max(tot["supervised_tokens"], 1)
    grad_norm = engine.get_global_grad_norm()
    record = {
        "step": step,
        "loss": loss_sum / max(tot["micro_batches"], 1),
        "ce": ce_sum / n_sup,
        "z_loss": z_sum / n_sup,
        "lr": float(engine.get_lr()[0]),
        "grad_norm": float(grad_norm) if grad_norm is not None else None,
        "tokens_per_s": tot["real_tokens"] / elapsed if elapsed > 0 else 0.0,
        "padding_share": 1.0 - tot["real_tokens"] / max(tot["slot_tokens"], 1),
        "data_wait_share": tot["data_wait_s"] / dist.world_size / elapsed if elapsed > 0 else 0.0,
        "supervised_tokens": tot["supervised_tokens"],
        "time_s": elapsed,
        "phase_s": dict(phase),
        "dataset_samples": dict(counts["samples"]),
        "dataset_tokens": dict(counts["tokens"]),
    }
    return record


def _emit(cfg: TrainConfig, record: dict, writer: Any, bar: Any) -> None:
    with open(os.path.join(cfg.ckpt.output_dir, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
    total = sum(record["dataset_samples"].values()) or 1
    mix = " ".join(f"{k}={v / total:.2f}" for k, v in sorted(record["dataset_samples"].items()))
    gn = record["grad_norm"]
    line = (f"step {record['step']} loss {record['loss']:.4f} z {record['z_loss']:.2f} "
            f"lr {record['lr']:.2e} gnorm {gn if gn is None else round(gn, 3)} "
            f"tok/s {record['tokens_per_s']:.0f} pad {record['padding_share']:.1%} "
            f"wait {record['data_wait_share']:.1%} mix [{mix}]")
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
    if writer is not None:
        for key in ("loss", "ce", "z_loss", "lr", "grad_norm", "tokens_per_s", "padding_share",
                    "data_wait_share"):
            if record[key] is not None:
                writer.add_scalar(f"train/{key}", record[key], record["step"])
        for name, n in record["dataset_samples"].items():
            writer.add_scalar(f"data/samples/{name}", n, record["step"])
            writer.add_scalar(f"data/tokens/{name}", record["dataset_tokens"][name], record["step"])


def _save(cfg: TrainConfig, dist: DistInfo, engine: Any, loader: Any, counts: dict, step: int,
          root: str) -> None:
    import torch
    states = _gather_host(loader.state_dict(), dist.world_size)
    state = ckpt_lib.client_state(step, states, {k: dict(v) for k, v in counts.items()},
                                  dist.world_size)
    tag = ckpt_lib.tag_for_step(step)
    if dist.is_main:  # saving over a tag (after a resume from an older one): unmarked until done
        ckpt_lib.unmark(root, tag)
    ckpt_lib.kill_hook_for_tests(engine, root, tag, step, dist.rank)
    # DeepSpeed barriers before writing; rank 0 writes `latest` after its own files only.
    engine.save_checkpoint(root, tag=tag, client_state=state)
    if dist.world_size > 1:
        torch.distributed.barrier()  # every rank's files are written
    if dist.is_main:
        ckpt_lib.mark_complete(root, tag, step, dist.world_size)
        deleted = ckpt_lib.prune_checkpoints(root, cfg.ckpt.keep_last)
        print(f"saved checkpoint {os.path.join(root, ckpt_lib.tag_for_step(step))}"
              + (f" (deleted {', '.join(deleted)})" if deleted else ""), flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The trainer's flags on ``parser`` (for the ``lumina`` subcommand registry)."""
    build_parser(parser)


def run(args: argparse.Namespace) -> int:
    """Train from parsed flags; a bad setting exits 2 with one line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        train(config_from_namespace(args))
    except ConfigError as exc:
        print(f"lumina-train: error: {exc}", file=sys.stderr)
        return 2
    shutdown_distributed(exit_code=0)
    return 0  # not reached


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``lumina-train``: parse flags, train, exit 0; a bad setting exits 2 with one line."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
