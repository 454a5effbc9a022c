"""DeepSpeed ZeRO-3 trainer of Chameleon (Lumina-mGPT) on the streamed token mixture.

Launch it the way DeepSpeed jobs are launched; all of these run the same code::

    deepspeed lumina/train.py --deepspeed_config zero3 --data_config mix.yaml \
        --init_from MODEL --output_dir out [--pack true] ...
    deepspeed --module lumina.train ...
    torchrun --nproc_per_node 8 -m lumina.train ...
    python -m lumina.train ...                      # one process
    srun ... python -m lumina.train ...             # see scripts/srun_train.sh

CPU runs use gloo, GPU runs NCCL (DeepSpeed's accelerator picks). The loop is thin: the model and
loss live in :mod:`lumina.model` / :mod:`lumina.loss`, checkpoints in :mod:`lumina.checkpoint`,
the settings in :mod:`lumina.train_config`, the data in ``wds_tools``. Metrics stay on the device
(or the host, when they come from the CPU batch) and are reduced every ``--log_every`` steps: that
is the only host sync the loop adds. ``--pack true`` trains on packed rows (several samples per
row, attention kept inside each sample: :mod:`lumina.packing`); ``--max_tokens N`` sizes
micro-batches by tokens instead of samples. ``--resume auto`` continues under another number of
processes, micro-batch size or accumulation (:meth:`Trainer.prepare_resume`).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import os
import sys
import time
from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any, Callable, DefaultDict, Iterator, Optional, Protocol, Sequence

if TYPE_CHECKING:
    import torch

if __package__ in (None, ""):  # run as a file (`deepspeed lumina/train.py`): import as a package
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from lumina import checkpoint as ckpt_lib
from lumina.distributed import DistInfo, gather_objects, init_distributed, shutdown_distributed
from lumina.train_config import (
    ConfigError,
    TrainConfig,
    build_parser,
    config_from_namespace,
    load_deepspeed_json,
    resolve_deepspeed_config,
)

__all__ = [
    "LoaderFactory",
    "Trainer",
    "add_arguments",
    "build_engine",
    "global_loss_factor",
    "lr_lambda",
    "main",
    "resolved_deepspeed_config",
    "run",
    "supervised_count",
    "train",
    "wds_loader_factory",
]

log = logging.getLogger("lumina.train")


class StatefulLoader(Protocol):
    """What the trainer needs of a batch source: the ``wds_tools.loader.StreamingLoader`` face."""

    def __iter__(self) -> Iterator[dict]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def gather_state_dicts(self) -> dict: ...


# (config, rank, world_size, micro_batch_size) -> this rank's loader.
LoaderFactory = Callable[[TrainConfig, int, int, int], StatefulLoader]


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


def resolved_deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of ``cfg`` for ``world_size`` processes (batch sizes filled in)."""
    return resolve_deepspeed_config(
        load_deepspeed_json(cfg.deepspeed_config), cfg.data, cfg.optim, world_size
    )


def build_engine(
    cfg: TrainConfig, dist: DistInfo, fresh_start: bool = True, ds: Optional[dict] = None
) -> tuple[Any, dict]:
    """The DeepSpeed engine around :class:`lumina.model.LuminaChameleon`, and the resolved config
    (``ds``, or :func:`resolved_deepspeed_config`)."""
    import deepspeed
    import torch

    from lumina.model import build_model, optimizer_groups

    ds = ds if ds is not None else resolved_deepspeed_config(cfg, dist.world_size)
    torch.manual_seed(cfg.data.seed)
    model, handle = build_model(cfg.model, cfg.loss, ds, rank=dist.rank, zero_image_rows=fresh_start)
    groups = optimizer_groups(model, cfg.optim.weight_decay)
    fn = lr_lambda(cfg)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=groups,
        config=ds,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, fn),
    )
    del handle  # deepspeed.initialize has read it; the engine holds the config now
    return engine, ds


def wds_loader_factory(
    cfg: TrainConfig, rank: int, world_size: int, micro_batch_size: int, grad_accum: int = 1
):
    """The streamed WebDataset mixture of ``--data_config`` (wds_tools); a setting the loader
    refuses (``--max_tokens`` with a bounded mixture...) is a one-line ConfigError.

    ``grad_accum``: micro-batches per optimizer step (the loader maps the run's layout-free
    position to this rank's micro-batches with it, and counts optimizer steps for schedules).
    """
    from wds_tools.loader import build_loader

    data = cfg.data
    if not data.data_config:
        raise ConfigError("--data_config is required (a data config YAML or a manifest)")
    try:
        return build_loader(
            data.data_config,
            rank=rank,
            world_size=world_size,
            batch_size=micro_batch_size,
            num_workers=data.num_workers,
            max_seq_len=data.max_seq_len,
            pad_id=data.pad_id,
            seed=data.seed,
            pack=data.pack,
            io_options=data.io_options(),
            grad_accum=grad_accum,
            max_tokens=data.max_tokens,
        )
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        flag = "--max_tokens" if data.max_tokens is not None and "max_tokens" in str(exc) else "--data_config"
        raise ConfigError(f"{flag}: {exc}") from None


# Peak dense bf16 FLOP/s of known accelerators (by device-name substring), for the MFU estimate.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}


def model_flops(num_params: int, num_layers: int, hidden: int, tokens: float, sum_len_sq: float) -> float:
    """Model FLOPs of a forward + backward pass (PaLM's convention, appendix B):
    ``6 * N * tokens + 12 * layers * hidden * sum(len_i^2)``.

    ``N``: the matmul parameters a token passes through (decoder layers and ``lm_head``; the
    embedding is a lookup, the frozen VQ encoder does not run); ``len_i``: the real tokens of
    each sample (a padded row counts its sample's length, a packed row each of its samples'), so
    padding and cross-sample attention are not counted as useful work. The attention term counts
    the full ``len x len`` score matrix, as PaLM and most published MFU figures do; a causal
    kernel computes about half of it. Activation-checkpointing recompute is not counted."""
    return 6.0 * num_params * tokens + 12.0 * num_layers * hidden * sum_len_sq


def _flop_shape(engine: Any) -> tuple[int, int, int]:
    """(N, layers, hidden) of :func:`model_flops` for the engine's Chameleon (ZeRO-3 aware)."""
    chameleon = engine.module.chameleon
    numel = lambda p: int(getattr(p, "ds_numel", 0) or p.numel())  # noqa: E731
    n = sum(numel(p) for p in chameleon.model.layers.parameters())
    n += numel(chameleon.lm_head.weight)
    return n, chameleon.config.num_hidden_layers, chameleon.config.hidden_size


def _peak_flops(cfg: TrainConfig, device: Any) -> Optional[float]:
    """Peak FLOP/s of one accelerator: ``--peak_tflops``, else a known GPU's, else None (CPU)."""
    if device.type != "cuda":
        return None
    if cfg.log.peak_tflops:
        return cfg.log.peak_tflops * 1e12
    import torch

    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


class _Meter:
    """Per-window accumulators: device tensors for the loss, host numbers for the batch stats."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        import torch

        self.dev = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, ce_sum, z_sum
        self.host: DefaultDict[str, float] = defaultdict(float)
        self.samples: Counter = Counter()
        self.tokens: Counter = Counter()
        self.t0 = time.perf_counter()

    def add_batch(self, batch: dict, wait_s: float) -> None:
        """Count a batch from its CPU tensors (no device sync): tokens, slots, samples and the
        per-sample lengths (rows when padded, segments when packed)."""
        from lumina.packing import sample_lengths

        mask = batch["attention_mask"]
        real = sample_lengths(mask, batch.get("segment_ids"))
        self.host["micro_batches"] += 1
        self.host["samples"] += len(real)
        self.host["real_tokens"] += sum(real)
        self.host["len_sq"] += sum(n * n for n in real)
        self.host["slot_tokens"] += mask.numel()
        self.host["data_wait_s"] += wait_s
        for name, n in zip(batch.get("dataset", ["?"] * len(real)), real):
            self.samples[name] += 1
            self.tokens[name] += n

    def add_loss(self, out: Any) -> None:
        import torch

        self.dev += torch.stack([out.loss.detach().double(), out.ce_sum.double(), out.z_sum.double()])
        self.host["supervised_tokens"] += out.num_tokens


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
        os.path.join(out, "tokenizer"),
    )
    if found is None:
        log.warning("no tokenizer found (set --tokenizer); exports will not hold one")


# Optimizer group entries the LR scheduler owns (the same in every group of this trainer).
_SCHEDULED = ("params", "lr", "initial_lr")


def _group_settings(engine: Any) -> list[dict]:
    """Each optimizer parameter group's settings (weight decay, betas, eps...), JSON-safe."""

    def plain(v: Any) -> bool:
        return v is None or isinstance(v, (bool, int, float, str))

    out = []
    for group in engine.optimizer.optimizer.param_groups:  # ZeRO-3 wraps the torch optimizer
        entry = {}
        for key, value in group.items():
            if key in _SCHEDULED:
                continue
            if isinstance(value, (tuple, list)) and all(plain(v) for v in value):
                entry[key] = list(value)
            elif plain(value):
                entry[key] = value
        out.append(entry)
    return out


def _mend_universal_load(engine: Any, saved: list[dict], where: str) -> None:
    """Undo two slips of DeepSpeed 0.19.8's universal load under ZeRO-3 (measured here):

    * every parameter group gets the first group's settings: put each group's ``saved``
      settings back (else norms and biases decay like matrices);
    * every group's Adam state shares one ``step`` tensor, which torch's AdamW increments in
      place once per group, so the step count (and the bias correction) ran ahead: give each
      its own copy.
    """
    import torch

    optimizer = engine.optimizer.optimizer  # ZeRO-3 wraps the torch optimizer
    groups = optimizer.param_groups
    if len(saved) != len(groups):
        raise ConfigError(
            f"--resume: the checkpoint {where} has {len(saved)} optimizer groups, this run {len(groups)}"
        )
    for group, entry in zip(groups, saved):
        for key, value in entry.items():
            if key not in _SCHEDULED:
                group[key] = tuple(value) if isinstance(value, list) else value
    for state in optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def supervised_count(batch: dict, attn_implementation: str) -> int:
    """The supervised shifted positions of a loader batch, from its CPU labels laid out as
    :func:`lumina.packing.model_inputs` gives them to the model (packed rows flattened to one for
    flash attention): the count :func:`lumina.loss.supervised_positions` gives the loss."""
    from lumina.loss import IGNORE_INDEX
    from lumina.packing import flattens_rows

    labels = batch["labels"]
    if "segment_ids" in batch and flattens_rows(attn_implementation):
        labels = labels.reshape(1, -1)
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def global_loss_factor(
    local_tokens: int, world_size: int, grad_accum: int, device: torch.device
) -> torch.Tensor:
    """``world_size * grad_accum / global_tokens`` as a 0-dim fp64 tensor on ``device``, where
    ``global_tokens`` is ``local_tokens`` (this rank's supervised tokens in the step) summed over
    the data-parallel ranks (one all-reduce, none in a world of one; on the device, reached by a
    pinned asynchronous copy on GPUs, so no host sync). A micro-batch's token-mean loss times
    ``its tokens x this`` sums, after DeepSpeed divides by ``grad_accum`` in ``backward`` and
    averages the gradients over the ranks, to ``sum of per-token losses / global_tokens``. A step
    without a supervised token (the micro-batch losses are then 0) divides by 1."""
    import torch

    total = torch.tensor(local_tokens, dtype=torch.int64)
    if device.type == "cuda":  # a plain copy would wait for the queued work of the last step
        total = total.pin_memory().to(device, non_blocking=True)
    else:
        total = total.to(device)
    if world_size > 1:
        torch.distributed.all_reduce(total)
    # fp64, so that a micro-batch's weight ``its tokens x this`` is exactly 1 when every
    # micro-batch holds the same number of tokens (then global = micro, bit for bit).
    return world_size * grad_accum / total.clamp_min(1).double()


class Trainer:
    """One training run, in named steps: :meth:`resume_or_start`, then :meth:`fit`, which runs
    :meth:`train_step` (one optimizer step of ``grad_accum`` micro-batches) until ``--max_steps``,
    ``--stop_after`` or the end of a bounded mixture, with :meth:`log_window` and
    :meth:`maybe_save` after each step.

    The run's position is ``step`` plus the loader's state plus the per-dataset ``counts``;
    :meth:`save` writes all three, :meth:`resume_or_start` reads them back.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        dist: DistInfo,
        loader_factory: Optional[LoaderFactory] = None,
        sync_timing: bool = False,
    ) -> None:
        import torch

        self.cfg, self.dist = cfg, dist
        if cfg.data.pack:
            from lumina.packing import check_packed_path

            try:
                check_packed_path(cfg.model.attn_implementation)
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
        self.resume = ckpt_lib.resolve_resume(cfg.ckpt.resume, cfg.ckpt.output_dir)
        self.root = ckpt_lib.checkpoint_root(cfg.ckpt.output_dir)
        ds = resolved_deepspeed_config(cfg, dist.world_size)
        self.grad_accum = ds["gradient_accumulation_steps"]
        micro = ds["train_micro_batch_size_per_gpu"]
        self.layout = ckpt_lib.train_layout(dist.world_size, micro, self.grad_accum)
        self.load_from = self.prepare_resume(ds)
        self.engine, ds = build_engine(cfg, dist, fresh_start=self.resume is None, ds=ds)
        factory = loader_factory or functools.partial(wds_loader_factory, grad_accum=self.grad_accum)
        self.loader = factory(cfg, dist.rank, dist.world_size, micro)
        self.step, self.last_saved = 0, -1
        self.counts: dict = {"samples": Counter(), "tokens": Counter()}
        self.stop_at = min(cfg.ckpt.max_steps, cfg.ckpt.stop_after or cfg.ckpt.max_steps)
        self.meter = _Meter(dist.device)
        self.phase: DefaultDict[str, float] = defaultdict(float)
        self.records: list[dict] = []
        if sync_timing:
            from deepspeed.accelerator import get_accelerator

            self._sync: Callable[[], Any] = get_accelerator().synchronize
        else:
            self._sync = lambda: None
        self.image_ids = self.engine.module.image_ids.cpu() if cfg.loss.mask_image_logits else None
        self.dtype = torch.bfloat16 if ds.get("bf16", {}).get("enabled") else torch.float32
        self.flop_shape = _flop_shape(self.engine)
        self.peak_flops = _peak_flops(cfg, dist.device)

    # -- the run's position ---------------------------------------------------------------------
    def prepare_resume(self, ds: dict) -> Optional[tuple[str, str]]:
        """Where the engine loads the resumed checkpoint from: its tag folder, or, when the number
        of processes changed, DeepSpeed's universal conversion of it (rank 0 converts once, the
        others wait; ``ds`` is told to load it). Logs one line when the layout changed.

        ZeRO-3 shards the fp32 master weights and Adam moments over the processes, so only a
        change in their number needs the conversion; a micro-batch or accumulation change alone
        loads the shards as they are (the loader maps its position to the new batches).
        """
        if self.resume is None:
            return None
        root, tag = self.resume
        changes = ckpt_lib.layout_changes(ckpt_lib.saved_layout(root, tag), self.layout)
        if not changes:
            return self.resume
        dist, note = self.dist, "the ZeRO-3 shards load as they are"
        load_from = self.resume
        if any(c.startswith(ckpt_lib.LAYOUT_KEYS["world_size"]) for c in changes):
            seconds, failure = 0.0, None
            if dist.is_main:
                try:
                    _, seconds = ckpt_lib.convert_to_universal(root, tag)
                except ConfigError as exc:
                    failure = str(exc)
            failure = gather_objects(failure, dist.world_size)[0]  # the others wait for rank 0
            if failure:
                raise ConfigError(failure)
            ds["checkpoint"] = {**ds.get("checkpoint", {}), "load_universal": True}
            load_from = (os.path.join(root, ckpt_lib.UNIVERSAL_DIR), tag)
            how = f"converted in {seconds:.1f} s" if seconds else "converted before"
            note = f"model and optimizer from DeepSpeed's universal checkpoint ({how})"
        if dist.is_main:
            print(
                f"resuming {os.path.join(root, tag)} under another layout: {', '.join(changes)}; {note}",
                flush=True,
            )
        return load_from

    def resume_or_start(self) -> None:
        """Continue from the checkpoint ``--resume`` resolved to, or write a fresh run's files."""
        if self.resume is None or self.load_from is None:
            if self.dist.is_main:
                _write_run_files(self.cfg, self.engine)
                ckpt_lib.use_markers(self.root)
            return
        where = os.path.join(*self.resume)
        settings = _group_settings(self.engine)  # this run's, for checkpoints that lack them
        path, state = self.engine.load_checkpoint(self.load_from[0], tag=self.load_from[1])
        if path is None:
            raise ConfigError(f"--resume: could not load the checkpoint {where}")
        if self.load_from != self.resume:  # the universal path
            saved = ckpt_lib.saved_optimizer_groups(*self.resume) or settings
            _mend_universal_load(self.engine, saved, where)
        state = ckpt_lib.check_client_state(state, where, None)
        self.step = self.last_saved = int(state["step"])
        try:
            self.loader.load_state_dict({"ranks": state["loader_states"]})
        except ValueError as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"--resume: the loader cannot continue from {where}: {exc}") from None
        self.counts = {k: Counter(v) for k, v in state.get("data_counts", self.counts).items()}
        if self.dist.is_main:
            print(f"resumed from {where} at step {self.step}", flush=True)

    # -- the loop -------------------------------------------------------------------------------
    def fit(self) -> list[dict]:
        """Train until the stop step or the end of the data; returns rank 0's metric records."""
        import torch

        writer, bar = _logger_sinks(self.cfg, self.dist, self.step)
        batches: Iterator[dict] = iter(self.loader)
        self.engine.train()
        ended = False
        while self.step < self.stop_at:
            # Dropout masks depend on (seed, step, rank) only: a resumed run draws the same ones.
            torch.manual_seed(
                self.cfg.data.seed * 1_000_003 + self.step * self.dist.world_size + self.dist.rank
            )
            if not self.train_step(batches):
                ended = True
                break
            self.step += 1
            if bar is not None:
                bar.update(1)
            self.log_window(writer, bar)
            self.maybe_save()
        self.finish(ended)
        for sink in (bar, writer):
            if sink is not None:
                sink.close()
        return self.records

    def train_step(self, batches: Iterator[dict]) -> bool:
        """One optimizer step over ``grad_accum`` micro-batches; False when the data ended first
        (every rank yields the same number of batches, so all ranks see the end together; the
        partial accumulation is dropped, untrained).

        The step's micro-batches are fetched first: under ``--loss_norm global`` the loss is
        normalised by the supervised tokens of the whole global batch, counted from the CPU
        labels and summed over the ranks (one small all-reduce, no host sync) before the first
        backward pass."""
        step: list[dict] = []
        for _ in range(self.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                return False
            wait = time.perf_counter() - t0
            self.meter.add_batch(batch, wait)
            self.phase["data_wait_s"] += wait
            step.append(batch)
        if self.cfg.loss.loss_norm == "micro":
            for batch in step:
                self.micro_step(batch)
            return True
        attn = self.cfg.model.attn_implementation
        counts = [supervised_count(batch, attn) for batch in step]
        per_token = global_loss_factor(sum(counts), self.dist.world_size, self.grad_accum, self.dist.device)
        for batch, count in zip(step, counts):
            self.micro_step(batch, per_token, count)
        return True

    def micro_step(
        self,
        batch: dict,
        per_token: Optional[torch.Tensor] = None,
        num_tokens: Optional[int] = None,
    ) -> None:
        """Forward, backward and (on the last micro-batch of a step, inside DeepSpeed) the
        optimizer, timed by phase.

        ``per_token`` (``--loss_norm global``, from :func:`global_loss_factor`): the micro-batch's
        token-mean loss is backpropagated times ``num_tokens * per_token``, its share of the global
        batch's per-token mean; ``num_tokens`` is the count :meth:`train_step` summed, checked
        against the loss's own. None: the token-mean loss as it is (``--loss_norm micro``)."""
        import torch

        from lumina.packing import model_inputs

        labels = batch["labels"]
        if self.image_ids is not None and torch.isin(labels, self.image_ids).any():
            raise ConfigError(
                "--mask_image_logits is set but a batch has image-token targets "
                "(their loss would be infinite); unset it to train generation"
            )
        t1 = time.perf_counter()
        out = self.engine(
            **model_inputs(batch, self.cfg.model.attn_implementation, self.dtype, self.dist.device)
        )
        loss = out.loss
        if per_token is not None:
            if out.num_tokens != num_tokens:
                raise RuntimeError(
                    f"--loss_norm global: the trainer counted {num_tokens} supervised tokens in a "
                    f"micro-batch, the loss {out.num_tokens}"
                )
            loss = loss * (per_token * out.num_tokens).to(loss.dtype)
        self.engine.backward(loss)
        self._sync()
        t2 = time.perf_counter()
        self.engine.step()  # DeepSpeed steps the optimizer on the last micro-batch only
        self._sync()
        self.phase["fwd_bwd_s"] += t2 - t1
        self.phase["optimizer_s"] += time.perf_counter() - t2
        self.meter.add_loss(out)

    def finish(self, ended: bool) -> None:
        """The end of the loop: a checkpoint if the data ran out, a note if ``--stop_after``."""
        main = self.dist.is_main
        if ended:
            if main:
                print(f"the data ended after step {self.step}; stopping", flush=True)
            if self.step != self.last_saved and self.step > 0:
                self.save()
        stop_after = self.cfg.ckpt.stop_after
        if main and stop_after is not None and self.step == stop_after < self.cfg.ckpt.max_steps:
            print(f"stopped at step {self.step} (--stop_after), as if killed; rerun to resume", flush=True)

    # -- metrics --------------------------------------------------------------------------------
    def log_window(self, writer: Any, bar: Any) -> None:
        """Every ``--log_every`` steps (and at the stop step): reduce the window, log it."""
        if self.step % self.cfg.log.log_every and self.step != self.stop_at:
            return
        record = self.reduce_window()
        if self.dist.is_main:
            self.records.append(record)
            _emit(self.cfg, record, writer, bar)
        self.meter.reset()
        self.phase = defaultdict(float)

    def reduce_window(self) -> dict:
        """One all-reduce of the device sums, one gather of the host stats (log steps only)."""
        import torch

        meter, dist = self.meter, self.dist
        sums = meter.dev.clone()
        if dist.world_size > 1:
            torch.distributed.all_reduce(sums)
        host = gather_objects(
            {"h": dict(meter.host), "s": dict(meter.samples), "t": dict(meter.tokens)}, dist.world_size
        )
        loss_sum, ce_sum, z_sum = sums.tolist()
        tot: DefaultDict[str, float] = defaultdict(float)
        for h in host:
            for key, value in h["h"].items():
                tot[key] += value
            self.counts["samples"].update(h["s"])
            self.counts["tokens"].update(h["t"])
        elapsed = time.perf_counter() - meter.t0
        n_sup = max(tot["supervised_tokens"], 1)
        grad_norm = self.engine.get_global_grad_norm()
        flops = model_flops(*self.flop_shape, tot["real_tokens"], tot["len_sq"])
        flops_per_s = flops / elapsed if elapsed > 0 else 0.0
        mfu = flops_per_s / (self.peak_flops * dist.world_size) if self.peak_flops else None
        return {
            "step": self.step,
            "loss": loss_sum / max(tot["micro_batches"], 1),
            "ce": ce_sum / n_sup,
            "z_loss": z_sum / n_sup,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": tot["real_tokens"] / elapsed if elapsed > 0 else 0.0,
            "samples_per_s": tot["samples"] / elapsed if elapsed > 0 else 0.0,
            "model_tflops_per_s": flops_per_s / 1e12,
            "mfu": mfu,
            "padding_share": 1.0 - tot["real_tokens"] / max(tot["slot_tokens"], 1),
            "data_wait_share": tot["data_wait_s"] / dist.world_size / elapsed if elapsed > 0 else 0.0,
            "supervised_tokens": int(tot["supervised_tokens"]),
            "time_s": elapsed,
            "phase_s": dict(self.phase),
            "dataset_samples": dict(self.counts["samples"]),
            "dataset_tokens": dict(self.counts["tokens"]),
        }

    # -- checkpoints ----------------------------------------------------------------------------
    def maybe_save(self) -> None:
        """The save policy: every ``--save_every`` steps and at ``--max_steps``, once per step."""
        every, max_steps = self.cfg.ckpt.save_every, self.cfg.ckpt.max_steps
        due = (every and self.step % every == 0) or self.step == max_steps
        if due and self.step != self.last_saved:
            self.save()

    def save(self) -> None:
        """A checkpoint of the run's position (all ranks), marked complete once every rank's
        files are written, then pruned to ``--keep_last``."""
        import torch

        dist, root, tag = self.dist, self.root, ckpt_lib.tag_for_step(self.step)
        loader_states = self.loader.gather_state_dicts()["ranks"]  # a collective: every rank
        counts = {k: dict(v) for k, v in self.counts.items()}
        state = ckpt_lib.client_state(self.step, loader_states, counts, dist.world_size, self.layout)
        if dist.is_main and os.path.exists(os.path.join(root, tag)):
            # Saving over a tag (after a resume from an older one): gone until marked again, with
            # no shard of an earlier save under more processes left beside the new ones.
            ckpt_lib.clear_tag(root, tag)
        if dist.world_size > 1:
            torch.distributed.barrier()  # no rank writes into the tag before it is cleared
        self.write_checkpoint(tag, state)
        if dist.world_size > 1:
            torch.distributed.barrier()  # every rank's files are written
        if dist.is_main:
            groups = _group_settings(self.engine)
            ckpt_lib.mark_complete(root, tag, self.step, dist.world_size, self.layout, groups)
            deleted = ckpt_lib.prune_checkpoints(root, self.cfg.ckpt.keep_last)
            print(
                f"saved checkpoint {os.path.join(root, tag)}"
                + (f" (deleted {', '.join(deleted)})" if deleted else ""),
                flush=True,
            )
        self.last_saved = self.step

    def write_checkpoint(self, tag: str, client_state: dict) -> None:
        """DeepSpeed's sharded save of ``tag`` (every rank; DeepSpeed barriers before writing and
        rank 0 writes ``latest`` after its own files only)."""
        self.engine.save_checkpoint(self.root, tag=tag, client_state=client_state)


def train(
    cfg: TrainConfig, loader_factory: Optional[LoaderFactory] = None, sync_timing: bool = False
) -> list[dict]:
    """Run (or continue) training; returns the metric records rank 0 logged (others: ``[]``).

    ``loader_factory`` defaults to :func:`wds_loader_factory`; ``sync_timing`` synchronises the
    device around each phase so the recorded times split exactly (benchmarks only).
    """
    trainer = Trainer(cfg, init_distributed(), loader_factory, sync_timing)
    trainer.resume_or_start()
    return trainer.fit()


def _emit(cfg: TrainConfig, record: dict, writer: Any, bar: Any) -> None:
    with open(os.path.join(cfg.ckpt.output_dir, "metrics.jsonl"), "a") as fh:
        fh.write(json.dumps(record) + "\n")
    total = sum(record["dataset_samples"].values()) or 1
    mix = " ".join(f"{k}={v / total:.2f}" for k, v in sorted(record["dataset_samples"].items()))
    gn = record["grad_norm"]
    line = (
        f"step {record['step']} loss {record['loss']:.4f} z {record['z_loss']:.2f} "
        f"lr {record['lr']:.2e} gnorm {gn if gn is None else round(gn, 3)} "
        f"tok/s {record['tokens_per_s']:.0f} samp/s {record['samples_per_s']:.1f} "
        + (f"mfu {record['mfu']:.1%} " if record.get("mfu") is not None else "")
        + f"pad {record['padding_share']:.1%} wait {record['data_wait_share']:.1%} mix [{mix}]"
    )
    if bar is not None:
        bar.write(line)
    else:
        print(line, flush=True)
    if writer is not None:
        for key in (
            "loss",
            "ce",
            "z_loss",
            "lr",
            "grad_norm",
            "tokens_per_s",
            "samples_per_s",
            "model_tflops_per_s",
            "mfu",
            "padding_share",
            "data_wait_share",
        ):
            if record[key] is not None:
                writer.add_scalar(f"train/{key}", record[key], record["step"])
        for name, n in record["dataset_samples"].items():
            writer.add_scalar(f"data/samples/{name}", n, record["step"])
            writer.add_scalar(f"data/tokens/{name}", record["dataset_tokens"][name], record["step"])


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
