"""The stream core: mixed, sharded, shuffled, resumable batches for data-parallel training,
on numpy alone (no torch).

Planning, reading, mixing, collation and the loader's state live here. How batches leave a
rank is a *backend*: :class:`NumpyBackend` (in process, int64 arrays) here, and
``wds_tools.torch_loader.TorchBackend`` (DataLoader workers, shared-memory hand-off, tensors,
pinned memory, ``torch.distributed``) above. :func:`wds_tools.loader.build_loader` is the
front that picks one; imports run loader -> torch_loader -> stream, never back.

A run has ``K`` canonical *partitions* (fixed when it starts; see ``docs/streaming.md``,
Elastic resume). A partition reads its own slice of every dataset (``mixing.EpochSlice``) and
picks the dataset of every sample with its own ``mixing.Mixer``; its sample sequence depends on
the seed, the config and its own past only. Rank ``r`` of ``W`` serves the partitions
``p % W == r``; a fixed-size global micro-batch is the canonical positions ``[P, P + B*W)``, rank
``r`` takes those ``== r (mod W)`` and position ``i`` is served by partition ``i % K``. So the
state (``state_dict``: the run's clock and per-partition positions) loads under any world size
dividing ``K``, any number of workers, micro-batch size or accumulation, and the same global
batch gives the same samples under any layout.

Every DataLoader worker builds, per micro-batch, the rows of its partitions (its *piece*),
compact (ids in their stored dtype, a one-byte "not a target" mask, lengths:
``collate.pad_compact``) in one shared-memory buffer per transfer; the main process merges the
pieces into one contiguous ``[k, B, T]`` int64 tensor (``merge_pieces``). Each piece carries
the states of the partitions it touched, so the main process always knows the state that
reproduces exactly the batches still to come.

    loader = build_loader(load_data_config("data.yaml"), batch_size=8, num_workers=2,
                          max_seq_len=4096)
    for batch in loader:
        batch["input_ids"], batch["labels"], batch["attention_mask"]  # LongTensor [B, T]
        batch["lengths"]                                               # LongTensor [B]
        batch["dataset"], batch["__key__"]                             # list[str]

See ``docs/streaming.md`` for the semantics (what is dropped, determinism, resume).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from . import io as wio
from .collate import (
    PACK_FIELDS,
    PAD_FIELDS,
    compact_layout,
    expand,
    pack_batch,
    pack_compact,
    pad_batch,
    pad_compact,
)
from .config import DataConfig, resolve_data_config
from .format import IGNORE_INDEX, FormatError
from .mixing import DatasetPlan, EpochSlice, Mixer, dataset_weights, rng_for
from .reader import Shard, load_manifest

__all__ = [
    "build_stream",
    "StreamingLoader",
    "NumpyBackend",
    "Partition",
    "RunClock",
    "DatasetReader",
    "load_plans",
    "iter_mixed",
    "merge_states",
    "default_partitions",
    "STATE_VERSION",
]

log = logging.getLogger(__name__)
STATE_VERSION = 2
_STRATA = 4  # seed tag of stratified batch orders
_DEAD_EPOCHS = 16  # unreadable epochs in a row of one partition before the dataset is declared dead
_SHARD_CACHE = 16


def load_plans(cfg: DataConfig, opts: wio.IOOptions = wio.DEFAULT) -> List[DatasetPlan]:
    """Open every manifest of ``cfg`` (never a shard index) and plan from its counts."""
    plans = []
    for i, d in enumerate(cfg.datasets):
        try:
            manifest = load_manifest(d.manifest, opts)
        except (OSError, ValueError) as e:
            raise type(e)(f"{cfg.source}: dataset {d.name!r}: cannot open manifest: {e}") from None
        if not manifest["num_samples"]:
            raise ValueError(
                f"{cfg.source}: dataset {d.name!r}: manifest {wio.redact(d.manifest)} has no samples"
            )
        plans.append(DatasetPlan.from_manifest(i, d, manifest))
    return plans


# --- one dataset, one consumer ---------------------------------------------------------------


class DatasetReader:
    """The samples of one dataset for one consumer, epoch after epoch.

    ``take()`` returns ``(key, input_ids, spans, num_tokens)`` of the next readable sample.
    Position ``pos`` counts every slot of the epoch slice, read or skipped, so the state
    ``[epoch, pos, skipped_shards, skipped_samples, bad_shards]`` is exact.
    """

    def __init__(
        self,
        plan: DatasetPlan,
        cfg: DataConfig,
        seed: int,
        consumer: int,
        num_consumers: int,
        opts: wio.IOOptions = wio.DEFAULT,
        state: Optional[Sequence[Any]] = None,
        read_data: bool = True,
    ):
        self.plan, self.cfg, self.seed = plan, cfg, seed
        self.consumer, self.num_consumers, self.opts = consumer, num_consumers, opts
        self.read_data = read_data
        self.fail = cfg.on_error == "fail"
        self._shards: "OrderedDict[int, Shard]" = OrderedDict()
        epoch, pos, skipped_shards, skipped_samples, bad = state if state is not None else (0, 0, 0, 0, [])
        self.skipped_shards: int = skipped_shards
        self.skipped_samples: int = skipped_samples
        self.bad = set(bad)
        self._read_in_epoch = self._skipped_in_epoch = 0
        self._dead_epochs = 0
        self._peeked: Optional[tuple] = None
        self._start_epoch(epoch, pos)

    # -- state ------------------------------------------------------------------------------
    @property
    def pos(self) -> int:
        return (
            int(self.slice.window_start[self.w]) + self.q
            if self.w < self.slice.num_windows
            else self.slice.length
        )

    def state(self) -> list:
        if self._peeked is not None:
            return self._peeked[1]
        return [self.epoch, self.pos, self.skipped_shards, self.skipped_samples, sorted(self.bad)]

    # -- windows ----------------------------------------------------------------------------
    def _start_epoch(self, epoch: int, pos: int = 0) -> None:
        self.epoch = epoch
        self.slice = EpochSlice(
            self.plan, self.cfg.shuffle, self.seed, epoch, self.consumer, self.num_consumers
        )
        if not 0 <= pos <= self.slice.length:
            raise ValueError(
                f"loader state: position {pos} outside epoch of "
                f"{self.slice.length} samples of dataset {self.plan.name!r}"
            )
        self.w = self.slice.window_of(pos) if pos < self.slice.length else self.slice.num_windows
        self.order: List[int] = []
        self.q = 0
        # the window is read when the first sample is taken: a partition that is never asked
        # for this dataset holds no window (memory per rank: windows in use only)
        self._pending = self.w < self.slice.num_windows
        if self._pending:
            self.q = pos - int(self.slice.window_start[self.w])

    def _next_window(self) -> None:
        if self.w + 1 < self.slice.num_windows:
            self.w += 1
            self.q = 0
            self._load_window(self.w)
            return
        if self._read_in_epoch == 0 and self._skipped_in_epoch >= self.slice.length:
            # a partition's slice can lie inside bad shards for one epoch (the next epoch
            # slices another shard order); many in a row means the dataset is unreadable
            self._dead_epochs += 1
            if self._dead_epochs >= _DEAD_EPOCHS or not self.cfg.shuffle.shards:
                raise FormatError(
                    f"dataset {self.plan.name!r}: {self._dead_epochs} epoch(s) in a row of this "
                    f"partition's shards were unreadable (see the warnings above)"
                )
        else:
            self._dead_epochs = 0
        self._read_in_epoch = self._skipped_in_epoch = 0
        self.bad = set()
        self._start_epoch(self.epoch + 1, 0)
        if self._pending:
            self._pending = False
            self._load_window(self.w)

    def _shard(self, s: int) -> Shard:
        sh = self._shards.get(s)
        if sh is None:
            sh = Shard.open(self.plan.urls[s], self.plan.index_urls[s], self.opts)
            if self.opts.verify_checksums and self.read_data:
                sh.verify_checksum()  # FormatError -> _shard_failed, like any bad shard
            if len(sh) != int(self.plan.shard_samples[s]):
                raise FormatError(
                    f"{sh.where}: index has {len(sh)} samples, the manifest says "
                    f"{int(self.plan.shard_samples[s])}"
                )
            self._shards[s] = sh
            if len(self._shards) > _SHARD_CACHE:
                self._shards.popitem(last=False)
        else:
            self._shards.move_to_end(s)
        return sh

    def _load_window(self, w: int) -> None:
        # Parallel lists, not a tuple per sample: a window is built at C speed. Each block is
        # decoded as soon as it is read (format.decode_block: ids views + spans); a sample that
        # does not decode keeps its error, raised (or skipped) when the sample is taken.
        blocks, self.order = self.slice.window(w)
        self.w_shard: List[int] = []
        self.w_buf: List[Any] = []
        keys: List[Optional[str]] = []
        toks: List[int] = []
        ids: List[Optional[np.ndarray]] = []
        spans: List[Any] = []
        blk: List[int] = []
        errs: Dict[int, Exception] = {}
        for bi, (s, a, n) in enumerate(blocks):
            sh, buf = self._load_block(s, a, n)
            self.w_shard.append(s)
            self.w_buf.append(buf)
            blk.extend([bi] * n)
            if sh is None or buf is None:  # a bad shard, or a dry run: nothing to decode
                keys.extend([None] * n if sh is None else sh.keys[a : a + n])
                toks.extend([0] * n if sh is None else sh.num_tokens[a : a + n])
                ids.extend([None] * n)
                spans.extend([None] * n)
                continue
            keys.extend(sh.keys[a : a + n])
            toks.extend(sh.num_tokens[a : a + n])
            x, sp, _, errors = sh.decode_block(buf, sh.offsets[a], a, a + n)
            for k, e in errors.items():
                errs[len(ids) + k] = e
            ids.extend(x)
            spans.extend(sp)
        self.w_key, self.w_tok, self.w_blk = keys, toks, blk
        self.w_ids, self.w_spans, self.w_err = ids, spans, errs

    def _load_block(self, s: int, a: int, n: int) -> Tuple[Optional[Shard], Any]:
        """(shard, bytes of samples a..a+n-1); (None, False) when the shard is bad; bytes are
        None when not reading data (dry runs)."""
        if s in self.bad:
            return None, False
        try:
            sh = self._shard(s)
            if not self.read_data:
                return sh, None
            base = sh.offsets[a]
            end = sh.offsets[a + n - 1] + sh.lengths[a + n - 1]
            buf = np.empty(end - base, np.uint8)
            with wio.open_range(sh.url, base, end, self.opts) as f:
                got = wio.readinto_full(f, buf)
            buf.flags.writeable = False  # ids are views of it, read-only as before
            if got < end - base:
                raise FormatError(
                    f"{sh.where}: truncated shard: {got} of {end - base} bytes "
                    f"at byte {base} (samples {a}..{a + n - 1})"
                )
        except (FormatError, OSError) as e:
            self._shard_failed(s, e)
            return None, False
        return sh, buf

    def _shard_failed(self, s: int, e: BaseException) -> None:
        if self.fail:
            raise e
        log.warning(
            "dataset %r: skipping the rest of shard %s in epoch %d: %s",
            self.plan.name,
            wio.redact(self.plan.urls[s]),
            self.epoch,
            e,
        )
        self.bad.add(s)
        self.skipped_shards += 1

    # -- samples ----------------------------------------------------------------------------
    def take(self) -> Tuple[Optional[str], Optional[np.ndarray], Any, int]:
        """The next readable sample: (key, input_ids view, spans, num_tokens)."""
        if self._peeked is not None:
            out, self._peeked = self._peeked[0], None
            return out
        if self._pending:
            self._pending = False
            self._load_window(self.w)
        order = self.order
        while True:
            q = self.q
            if q >= len(order):
                self._next_window()
                order = self.order
                continue
            self.q = q + 1
            j = order[q]
            bi = self.w_blk[j]
            buf = self.w_buf[bi]
            if buf is False or (self.bad and self.w_shard[bi] in self.bad):
                self.skipped_samples += 1
                self._skipped_in_epoch += 1
                continue
            key, ntok = self.w_key[j], self.w_tok[j]
            if buf is None:
                self._read_in_epoch += 1
                return key, None, None, ntok
            ids = self.w_ids[j]
            if ids is None:
                self._shard_failed(self.w_shard[bi], self.w_err[j])
                self.skipped_samples += 1
                self._skipped_in_epoch += 1
                continue
            self._read_in_epoch += 1
            return key, ids, self.w_spans[j], ntok

    def peek(self) -> Tuple[Optional[str], Optional[np.ndarray], Any, int]:
        """The sample ``take()`` will return next, without consuming it (``state()`` still
        points before it)."""
        if self._peeked is None:
            before = self.state()
            self._peeked = (self.take(), before)
        return self._peeked[0]


# --- one canonical partition: samples ---------------------------------------------------------

_PHASE = 64  # partitions start their mixers this many choices apart (mod), see Partition


class Partition:
    """Canonical partition ``p`` of ``K``: its slice of every dataset, and its own mixer.

    Samples are taken one at a time (``take``) for the group the run chose for the micro-batch.
    State: ``{"taken": n, "datasets": {name: {"reader": [...], "units", "samples", "target",
    "tokens"}}}``, keyed by dataset *name*, so a config that adds, drops or reweights datasets
    still loads it. A fresh partition starts its mixer ``p % 64`` choices ahead: partitions in
    lockstep would otherwise all pick the same dataset at the same time, and a micro-batch,
    which spans consecutive partitions, would hold one dataset.
    """

    def __init__(
        self,
        p: int,
        num_partitions: int,
        plans: Sequence[DatasetPlan],
        cfg: DataConfig,
        *,
        seed: int,
        max_seq_len: int,
        opts: wio.IOOptions = wio.DEFAULT,
        state: Optional[Dict[str, Any]] = None,
        read_data: bool = True,
        weights: Optional[Sequence[float]] = None,
    ):
        self.p, self.plans, self.max_seq_len = p, plans, max_seq_len
        self.by_tokens = cfg.weight_by == "tokens"
        groups = cfg.groups
        caps = [
            None
            if pl.config.max_epochs is None
            else pl.config.max_epochs * pl.samples_per_epoch(num_partitions)
            for pl in plans
        ]
        w = list(weights) if weights is not None else list(dataset_weights(cfg, plans))
        self.mixer = Mixer(w, [groups.index(pl.config.group) for pl in plans], caps)
        ds = (state or {}).get("datasets", {})
        self.readers: List[DatasetReader] = []
        self.tokens = [0] * len(plans)
        for i, pl in enumerate(plans):
            s = ds.get(pl.name)
            self.readers.append(
                DatasetReader(pl, cfg, seed, p, num_partitions, opts, s and s["reader"], read_data)
            )
            if s:
                m = self.mixer
                m.units[i], m.samples[i], m.targets[i] = s["units"], s["samples"], float(s["target"])
                self.tokens[i] = s["tokens"]
        self.taken = int((state or {}).get("taken", 0))
        if state is None:
            for g, members in enumerate(self.mixer.members):
                if len(members) > 1:
                    for _ in range(p % _PHASE):
                        d = self.mixer.choose(g)
                        unit = min(plans[d].mean_tokens, max_seq_len) if self.by_tokens else 1
                        self.mixer.account(d, unit, real=False)

    def state(self) -> Dict[str, Any]:
        m = self.mixer
        return {
            "taken": self.taken,
            "datasets": {
                pl.name: {
                    "reader": self.readers[i].state(),
                    "units": m.units[i],
                    "samples": m.samples[i],
                    "target": m.targets[i],
                    "tokens": self.tokens[i],
                }
                for i, pl in enumerate(self.plans)
            },
        }

    def choose(self, g: int) -> int:
        return self.mixer.choose(g)

    def take(self, d: int) -> Tuple[Optional[str], Optional[np.ndarray], Any, int, int]:
        """The next sample of dataset ``d``: (key, ids, spans, num_tokens, epoch)."""
        r = self.readers[d]
        key, ids, spans, ntok = r.take()
        n = ntok if ntok < self.max_seq_len else self.max_seq_len
        self.mixer.account(d, n if self.by_tokens else 1)
        self.tokens[d] += n
        self.taken += 1
        return key, ids, spans, ntok, r.epoch

    def peek_tokens(self, d: int) -> int:
        return self.readers[d].peek()[3]


# --- the run's clock: micro-batches, steps, groups ----------------------------------------------


class RunClock:
    """What every rank and worker computes alike, from the run's state alone: the count of
    micro-batches and optimizer steps, the canonical position (samples of fixed-size
    micro-batches before the next one), the group of the next micro-batch, and, for bounded
    streams, how many samples each partition has served per group (the end of the stream).

    ``next()`` returns ``(group, position, step)`` of the next micro-batch and advances, or None
    at the end of a bounded stream. Every rank's micro-batch ``u`` has the same group.
    """

    def __init__(
        self,
        cfg: DataConfig,
        plans: Sequence[DatasetPlan],
        *,
        num_partitions: int,
        world_size: int,
        batch_size: int,
        grad_accum: int,
        whole: bool,
        state: Optional[Dict[str, Any]] = None,
    ):
        self.cfg, self.plans = cfg, plans
        self.K, self.W, self.B, self.A, self.whole = num_partitions, world_size, batch_size, grad_accum, whole
        self.groups = cfg.groups
        self.members = [[i for i, p in enumerate(plans) if p.config.group == g] for g in self.groups]
        st = state or {}
        self.micro = int(st.get("micro", 0))
        self.step = int(st.get("step", 0))
        self.in_step = int(st.get("in_step", 0))
        if self.in_step >= self.A:  # resumed mid-step under a smaller accumulation
            self.step, self.in_step = self.step + 1, 0
        self.position = int(st.get("position", 0))
        self.group: Optional[int] = self.groups.index(st["group"]) if st.get("group") in self.groups else None
        gm = st.get("groups") or {}
        ng = len(self.groups)
        self.gmixer = Mixer([1.0] * ng, [0] * ng, [None] * ng)
        for gi, g in enumerate(self.groups):
            if g in gm:
                u, s, tgt = gm[g]
                self.gmixer.units[gi], self.gmixer.samples[gi], self.gmixer.targets[gi] = u, s, float(tgt)
        # per partition and group: samples served, against the group's capacity (bounded)
        self.cap: List[Optional[int]] = []
        for mem in self.members:
            caps = [plans[d].config.max_epochs for d in mem]
            self.cap.append(
                None
                if any(c is None for c in caps)
                else sum(int(c or 0) * plans[d].samples_per_epoch(self.K) for c, d in zip(caps, mem))
            )
        served = st.get("served") or {}
        self.served: List[Optional[np.ndarray]] = [
            np.asarray(served.get(g, [0] * self.K), dtype=np.int64) if self.cap[gi] is not None else None
            for gi, g in enumerate(self.groups)
        ]
        self._weights_step: Optional[int] = None
        self._weights: Optional[np.ndarray] = None

    def state(self) -> Dict[str, Any]:
        gm = self.gmixer
        return {
            "micro": self.micro,
            "step": self.step,
            "in_step": self.in_step,
            "position": self.position,
            "group": None if self.group is None else self.groups[self.group],
            "groups": {g: [gm.units[i], gm.samples[i], gm.targets[i]] for i, g in enumerate(self.groups)},
            "served": {g: s.tolist() for g, s in zip(self.groups, self.served) if s is not None},
        }

    def weights(self, step: int) -> np.ndarray:
        """Normalized dataset weights at ``step`` (cached per step; fixed weights: once)."""
        if self._weights is None or (self._weights_step != step and self.cfg.scheduled):
            self._weights = dataset_weights(self.cfg, self.plans, step)
            self._weights_step = step
        return self._weights

    def _hits(self) -> np.ndarray:
        """Samples each partition serves in the next fixed-size micro-batch."""
        n = self.B * self.W
        q, rem = divmod(n, self.K)
        h = np.full(self.K, q, dtype=np.int64)
        h[(self.position + np.arange(rem)) % self.K] += 1
        return h

    def _available(self, g: int) -> bool:
        served = self.served[g]
        cap = self.cap[g]
        if served is None or cap is None:
            return True
        return bool(np.all(served + self._hits() <= cap))

    def next(self) -> Optional[Tuple[int, int, int]]:
        w = self.weights(self.step)
        gm = self.gmixer
        ng = len(self.groups)
        if ng == 1:
            g = 0 if self._available(0) else -1
        elif self.in_step and self.group is not None and self._available(self.group):
            g = self.group  # a group holds for a whole optimizer step: layout-free for one G
        else:
            gm.set_weights([float(sum(w[d] for d in mem)) for mem in self.members])
            for gi in range(ng):  # an exhausted group leaves for good
                gm.caps[gi] = gm.samples[gi] if not self._available(gi) else None
            g = gm.choose(0) if any(gm.active(gi) for gi in range(ng)) else -1
        if g < 0:
            return None
        self.group = g
        if ng > 1:
            if self.whole:
                unit = 1.0
            elif self.cfg.weight_by == "tokens":
                unit = float(self.B * self.W * np.mean([self.plans[d].mean_tokens for d in self.members[g]]))
            else:
                unit = float(self.B * self.W)
            gm.account(g, unit)
        if self.served[g] is not None:
            self.served[g] += self._hits()
        out = (g, self.position, self.step)
        self.micro += 1
        if not self.whole:
            self.position += self.B * self.W
        self.in_step += 1
        if self.in_step == self.A:
            self.step, self.in_step = self.step + 1, 0
        return out

    def count_to_end(self) -> Optional[int]:
        """Micro-batches left before a bounded stream ends (None: unbounded)."""
        if any(c is None for c in self.cap):
            return None
        n = 0
        while self.next() is not None:
            n += 1
        return n


def largest_remainder(shares: Sequence[float], n: int) -> List[int]:
    """Integer counts summing to ``n`` closest to ``shares * n`` (largest remainders first)."""
    raw = [s * n for s in shares]
    out = [int(x) for x in raw]
    order = sorted(range(len(raw)), key=lambda i: (-(raw[i] - out[i]), i))
    for i in order[: n - sum(out)]:
        out[i] += 1
    return out


# --- batches of one rank: pieces from workers, merged in the consuming process -----------------


class _Arena:
    """One buffer, of exactly the size of the batches of one transfer; batches are carved out of
    it in order and cross to the consuming process as one buffer. ``buffer`` is a numpy uint8
    array here; :mod:`wds_tools.torch_loader` supplies one in shared memory for DataLoader
    workers (shared-memory allocation costs about its size, so it is exact)."""

    def __init__(self, nbytes: int, buffer: Optional[Any] = None):
        if buffer is None:
            buffer = np.empty(nbytes, dtype=np.uint8)
        self.buffer = buffer
        self.flat = buffer if isinstance(buffer, np.ndarray) else buffer.numpy()
        self.used = 0

    def take(self, shape, dtype) -> Tuple[int, np.ndarray]:
        """(byte offset, array) of the next piece (offsets aligned to 8 bytes)."""
        dtype = np.dtype(dtype)
        off = self.used
        n = _prod(shape) * dtype.itemsize
        self.used = off + _align(n)
        return off, self.flat[off : off + n].view(dtype).reshape(shape)

    def __call__(self, shape):  # an int64 [k, B, T] batch (``pad_batch``'s alloc)
        return self.take(shape, np.int64)[1]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _align(n: int) -> int:
    return (n + 7) // 8 * 8


def _carve(flat: np.ndarray, off: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    return flat[off : off + _prod(shape) * dtype.itemsize].view(dtype).reshape(shape)


class _RankStream:
    """The picklable description of one rank that a worker turns into its pieces of the rank's
    micro-batches.

    Rank ``r`` of ``W`` serves the partitions ``p % W == r``; worker ``w`` of ``n`` serves every
    ``n``-th of them. Fixed-size micro-batches (no packing, no token budget): micro-batch ``u``
    covers the canonical positions ``[P, P + B*W)`` and rank ``r`` takes those ``== r (mod W)``;
    position ``i`` is served by partition ``i % K``. Every worker contributes the rows of its
    partitions (its *piece*); the consuming process puts the pieces side by side (rows in worker
    order). Packed and token-budget micro-batches hold a data-dependent number of samples: each
    is built whole by worker ``u % n`` from its partitions in turn (``whole``).
    """

    def __init__(self, loader: "StreamingLoader"):
        self.plans, self.cfg, self.seed = loader.plans, loader.cfg, loader.seed
        self.rank, self.W, self.K = loader.rank, loader.world_size, loader.num_partitions
        self.num_slots = loader.num_slots
        # a chunk carries every worker's piece of ``transfer_batches x workers`` micro-batches:
        # per worker about ``transfer_batches`` micro-batches' worth of rows per hand-off
        self.transfer = loader.transfer_batches * loader.num_slots if loader.num_slots > 1 else 1
        self.batch_size, self.grad_accum, self.max_seq_len = (
            loader.batch_size,
            loader.grad_accum,
            loader.max_seq_len,
        )
        self.pad_id, self.pack, self.opts = loader.pad_id, loader.pack, loader.opts
        self.max_tokens = loader.max_tokens
        self.whole = loader.whole
        self.part_states = dict(loader._parts)
        self.clock_state = dict(loader._clock)
        self.cursors = list(loader._cursors)
        self.fields = PACK_FIELDS if loader.pack else PAD_FIELDS
        self.read_data = loader.read_data
        self.stratified = loader.cfg.stratified

    def partitions_of(self, worker: int) -> List[int]:
        return [p for j, p in enumerate(range(self.rank, self.K, self.W)) if j % self.num_slots == worker]

    def clock(self) -> RunClock:
        return RunClock(
            self.cfg,
            self.plans,
            num_partitions=self.K,
            world_size=self.W,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            whole=self.whole,
            state=self.clock_state,
        )

    def partition(self, p: int, weights: Optional[Any] = None) -> Partition:
        return Partition(
            p,
            self.K,
            self.plans,
            self.cfg,
            seed=self.seed,
            max_seq_len=self.max_seq_len,
            opts=self.opts,
            state=self.part_states.get(p),
            read_data=self.read_data,
            weights=weights,
        )

    # -- the samples of one micro-batch ------------------------------------------------------
    def _fixed(self, parts: Dict[int, Partition], g: int, pos: int, stratum) -> List[tuple]:
        W, K = self.W, self.K
        first = pos + (self.rank - pos) % W
        out = []
        for k in range(self.batch_size):
            i = first + W * k
            part = parts.get(i % K)
            if part is None:
                continue
            d = stratum(i) if stratum is not None else part.choose(g)
            out.append((d, part, part.take(d)))
        return out

    def _whole(self, parts: Dict[int, Partition], order: List[int], g: int, cursor: int):  # noqa: C901
        """(samples, rows or None, cursor) of a packed or token-budget micro-batch (or a
        fixed-size one built whole by one worker), taking from ``order``'s partitions in turn."""
        L = self.max_seq_len
        if self.max_tokens is not None and self.max_tokens < L:
            L = self.max_tokens
        got: List[tuple] = []
        rows: Optional[List[List[int]]] = [[]] if self.pack else None
        used = longest = 0
        while True:
            part = parts[order[cursor % len(order)]]
            d = part.choose(g)
            if self.pack:
                assert rows is not None
                n = min(part.peek_tokens(d), L)
                if used + n > L:
                    if len(rows) == self.batch_size:
                        break
                    rows.append([])
                    used = 0
                rows[-1].append(len(got))
                used += n
            elif self.max_tokens is not None:
                n = max(min(part.peek_tokens(d), L), longest)
                if got and (len(got) + 1) * n > self.max_tokens:
                    break
                longest = n
            got.append((d, part, part.take(d)))
            cursor += 1
            if rows is None and len(got) == self.batch_size:
                break
        return got, rows, cursor

    def _stratum(self, clock_step: int, step_start: int, weights: np.ndarray):
        """Dataset of canonical position ``i`` in a stratified step: exactly the largest-remainder
        counts of ``w * G``, in a seeded order."""
        G = self.batch_size * self.W * self.grad_accum
        counts = largest_remainder(list(weights), G)
        seq = np.repeat(np.arange(len(counts)), counts)
        seq = rng_for(self.seed, _STRATA, clock_step).permutation(seq)
        return lambda i: int(seq[i - step_start])

    # -- chunks -----------------------------------------------------------------------------
    def chunks(self, worker: int, shared_buffer: Optional[Any] = None) -> Iterator[Dict[str, Any]]:
        """Chunks of ``transfer`` consecutive micro-batches: this worker's piece of each.

        ``shared_buffer`` (given in a DataLoader worker: ``nbytes -> buffer``): pieces travel
        compact (``collate.pad_compact``/``pack_compact``: about 3 bytes per token instead of
        24) in one shared-memory buffer and are expanded in the consuming process. In process
        they are collated to int64 directly."""
        clock = self.clock()
        mine = self.partitions_of(worker)
        w0 = clock.weights(clock.step)
        parts = {p: self.partition(p, w0) for p in mine}
        # per group: the partition that builds the next sample (a sample that did not fit a
        # packed or budget micro-batch opens the group's next one)
        ng = len(self.cfg.groups)
        saved = self.cursors[worker] if worker < len(self.cursors) else None
        cursor = list(saved) if isinstance(saved, list) and len(saved) == ng else [0] * ng
        names = [p.name for p in self.plans]
        pack, compact = self.pack, shared_buffer is not None
        weights_step = clock.step
        strata: Dict[int, Any] = {}
        while True:
            plans: List[Dict[str, Any]] = []
            ended = False
            for _ in range(self.transfer):
                before = clock.step, clock.in_step
                nxt = clock.next()
                if nxt is None:
                    ended = True
                    break
                g, pos, step = nxt
                if step != weights_step and self.cfg.scheduled:
                    w = clock.weights(step)
                    for part in parts.values():
                        part.mixer.set_weights(list(w))
                    weights_step = step
                rows = None
                if self.whole:
                    if (clock.micro - 1) % self.num_slots == worker and mine:
                        got, rows, cursor[g] = self._whole(parts, mine, g, cursor[g])
                    else:
                        got = []
                else:
                    stratum = None
                    if self.stratified:
                        start = pos - before[1] * self.batch_size * self.W
                        if step not in strata:
                            strata.clear()
                            strata[step] = self._stratum(step, start, clock.weights(step))
                        stratum = strata[step]
                    got = self._fixed(parts, g, pos, stratum)
                touched = sorted({part.p for _, part, _ in got})
                plans.append(
                    {
                        "got": got,
                        "rows": rows,
                        "states": {p: parts[p].state() for p in touched},
                        "clock": clock.state(),
                        "cursor": list(cursor),
                    }
                )
            if plans:
                yield self._chunk(worker, plans, names, pack, compact, shared_buffer)
            if ended:
                return

    def _chunk(self, worker, plans, names, pack, compact, shared_buffer) -> Dict[str, Any]:
        msl = self.max_seq_len
        if self.max_tokens is not None and self.max_tokens < msl:
            msl = self.max_tokens
        k = len(self.fields)
        shapes: List[Optional[Tuple[int, int, int]]] = []
        layouts: List[Any] = []
        for pl in plans:
            got, rows = pl["got"], pl["rows"]
            # one pass over the samples: per-field lists for the meta (no generator per field)
            ds, keys, epochs, ids, spans, lens = [], [], [], [], [], []
            ntok_total = 0
            for d, _, s in got:
                ds.append(names[d])
                keys.append(s[0])
                ids.append(s[1])
                spans.append(s[2])
                n = s[3]
                ntok_total += n
                lens.append(n if n < msl else msl)
                epochs.append(s[4])
            pl["cols"] = (ds, keys, epochs, ids, spans, ntok_total)
            pl["lens"] = lens
            shape: Optional[Tuple[int, int, int]]
            if not got or not self.read_data:
                shape = (k, 0 if rows is None else len(rows), 0) if not got else None
            elif rows is None:
                shape = (k, len(lens), max(lens))
            else:
                shape = (k, len(rows), max(sum(lens[i] for i in r) for r in rows))
            shapes.append(shape)
            if compact and got and self.read_data and shape is not None:
                layouts.append(compact_layout(ids, shape, pack))
            else:
                layouts.append(None)
        if compact:
            nbytes = sum(_align(_prod(sh) * dt.itemsize) for lay in layouts if lay for _, sh, dt in lay)
            arena = _Arena(nbytes, shared_buffer(nbytes))
        else:
            arena = _Arena(sum(_prod(sh) * 8 for sh in shapes if sh is not None))
        metas = []
        for pl, shape, lay in zip(plans, shapes, layouts):
            got, rows, lens = pl["got"], pl["rows"], pl["lens"]
            ds, keys, epochs, ids, spans, ntok_total = pl["cols"]
            piece: Any = None
            if shape is not None and got:
                if lay is not None:
                    where, arrays = [], {}
                    for name, sh, dt in lay:
                        off, arrays[name] = arena.take(sh, dt)
                        where.append((name, off, sh, dt.str))
                    if rows is None:
                        pad_compact(ids, spans, msl, arrays)
                    else:
                        pack_compact(ids, spans, rows, msl, arrays)
                    piece = (shape, where)
                else:
                    off = arena.used
                    if rows is None:
                        pad_batch(ids, spans, msl, self.pad_id, arena)
                    else:
                        pack_batch(ids, spans, rows, msl, self.pad_id, arena)
                    piece = (shape, off)
            real = sum(lens)
            metas.append(
                {
                    "piece": piece,
                    "datasets": ds,
                    "keys": keys,
                    "epochs": epochs,
                    "lengths": lens if rows is None else [sum(lens[i] for i in r) for r in rows],
                    "tokens": real,
                    "truncated": ntok_total - real,
                    "states": pl["states"],
                    "clock": pl["clock"],
                    "cursor": pl["cursor"],
                }
            )
        return {"worker": worker, "arena": arena.buffer, "batches": metas, "compact": compact}


def merge_pieces(
    pieces: Sequence[Dict[str, Any]], flats: Sequence[np.ndarray], k: int, pad_id: int, empty=None
) -> Optional[np.ndarray]:
    """The ``[k, B, T]`` int64 batch of several workers' pieces, rows side by side (compact pieces
    expanded, int64 ones copied); shorter pieces are padded to the longest. ``empty(shape)``
    supplies the memory (a tensor's numpy view is written)."""
    live = [(m, f) for m, f in zip(pieces, flats) if m["piece"] is not None]
    if not live:
        return None
    b = sum(m["piece"][0][1] for m, _ in live)
    t = max(m["piece"][0][2] for m, _ in live)
    if len(live) == 1 and not isinstance(live[0][0]["piece"][1], list):
        (shape, off), flat = live[0][0]["piece"], live[0][1]
        return _carve(flat, off, shape, np.int64)  # in process: a view of the arena, no copy
    out_obj = empty((k, b, t)) if empty is not None else np.empty((k, b, t), np.int64)
    out = out_obj if isinstance(out_obj, np.ndarray) else out_obj.numpy()
    a = 0
    for m, flat in live:
        (shape, where) = m["piece"]
        _, pb, pt = shape
        view = out[:, a : a + pb, :pt]
        if isinstance(where, list):
            expand({name: _carve(flat, off, sh, dt) for name, off, sh, dt in where}, pad_id, view)
        else:
            view[...] = _carve(flat, where, shape, np.int64)
        if pt < t:
            out[0, a : a + pb, pt:] = pad_id
            out[1, a : a + pb, pt:] = IGNORE_INDEX
            out[2:, a : a + pb, pt:] = 0
        a += pb
    return out_obj


class NumpyBackend:
    """Batches as int64 numpy arrays, read in this process (no DataLoader workers, no torch).

    A backend answers four questions for :class:`StreamingLoader`: where chunks come from
    (``chunks``), what a batch plane becomes (``as_output``), where a merged batch is written
    (``empty_int64``: None = a fresh numpy array), and how states of all ranks are gathered
    (``gather``). ``simulate_workers=True`` runs the workers' pieces in this process, in the
    order a DataLoader delivers them (``wds-tools stream``'s whole-run replay)."""

    name = "numpy"
    empty_int64: Any = None

    def __init__(self, simulate_workers: bool = False):
        self.simulate_workers = simulate_workers

    def chunks(self, stream: _RankStream, num_workers: int) -> Iterator[Dict[str, Any]]:
        if not num_workers:
            return stream.chunks(0)
        if self.simulate_workers:
            return _round_robin([stream.chunks(w) for w in range(num_workers)])
        raise ValueError(
            "DataLoader workers need torch: pip install torch, or use num_workers=0 (reads in this process)"
        )

    @staticmethod
    def as_output(x: np.ndarray) -> Any:
        return x

    def gather(self, obj: Any, world_size: int) -> List[Any]:
        if world_size == 1:
            return [obj]
        raise RuntimeError(
            "gathering loader states across ranks needs torch.distributed "
            "(build the loader with output='torch')"
        )


def _round_robin(gens: List[Iterator[Dict[str, Any]]]) -> Iterator[Dict[str, Any]]:
    while True:
        for g in gens:
            try:
                yield next(g)
            except StopIteration:
                return


class StreamingLoader:
    """Iterable of micro-batches for one data-parallel rank; see ``build_loader``.

    Iterating starts the workers from the current state, so breaking out of a loop and
    iterating again continues exactly where the last delivered batch left off. The state
    (``state_dict``) is a position in the run's canonical stream: it loads under another world
    size, number of workers, micro-batch size, accumulation or data config (``load_state_dict``).
    """

    def __init__(
        self,
        cfg: DataConfig,
        plans: List[DatasetPlan],
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        num_workers: int,
        max_seq_len: int,
        pad_id: int,
        seed: int,
        pack: bool,
        opts: wio.IOOptions,
        transfer_batches: int = 4,
        backend: Optional["NumpyBackend"] = None,
        max_tokens: Optional[int] = None,
        grad_accum: int = 1,
        num_partitions: int = 1,
        partitions_fixed: bool = False,
        whole: bool = False,
    ):
        self.cfg, self.plans = cfg, plans
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.num_workers, self.grad_accum = batch_size, num_workers, grad_accum
        self.num_slots = max(1, num_workers)
        self.max_seq_len, self.pad_id, self.seed, self.pack = max_seq_len, pad_id, seed, pack
        self.opts, self.transfer_batches = opts, transfer_batches
        self.max_tokens = max_tokens
        self.num_partitions = num_partitions
        self._partitions_fixed = partitions_fixed  # given by the user: a state must agree
        self.whole = whole or pack or max_tokens is not None
        self.read_data = True  # False: dry runs (keys and token counts from the indexes only)
        self.backend = backend if backend is not None else NumpyBackend()
        self._parts: Dict[int, Dict[str, Any]] = {}
        self._clock: Dict[str, Any] = {}
        self._cursors: List[int] = [0] * self.num_slots
        self._stats = {"batches": 0, "padding": 0, "truncated": 0}
        self._generation = 0  # bumped by every __iter__ and load_state_dict
        self._check_layout()

    def _check_layout(self) -> None:
        K, W = self.num_partitions, self.world_size
        if K % W:
            raise ValueError(
                f"world size {W} does not divide the run's {K} partitions: use a world size that "
                f"divides {K} (fixed when the run started; set 'partitions:' in the data config "
                "to choose it)"
            )
        if self.num_slots > K // W:
            raise ValueError(
                f"num_workers={self.num_workers} is more than the {K // W} partitions of each "
                f"rank ({K} partitions / world size {W}): use at most {K // W} workers"
            )
        for p in self.plans:
            p.check_consumers(K)

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self._generation += 1
        gen = self._generation
        stream = _RankStream(self)
        chunks = self.backend.chunks(stream, self.num_workers)
        for batch in self._batches(chunks, stream):
            if gen != self._generation:
                raise RuntimeError(
                    "this loader was iterated again (or given a state) after this iterator "
                    "started: only the newest iterator continues the stream (it starts where "
                    "the last delivered batch left off)"
                )
            yield batch

    def _batches(self, chunks: Iterator[Dict[str, Any]], stream: _RankStream) -> Iterator[Dict[str, Any]]:
        """Micro-batches in this process: one chunk of every worker (in worker order, as the
        DataLoader delivers them) covers the same micro-batches; their pieces are merged."""
        n = self.num_slots
        k = len(stream.fields)
        to_tensor, empty = self.backend.as_output, self.backend.empty_int64
        while True:
            group = []
            for w in range(n):
                ch = next(chunks, None)
                if ch is None:
                    if w:
                        raise RuntimeError("loader: a worker ended before the others (please report this)")
                    return
                if ch["worker"] != w:
                    raise RuntimeError(
                        f"loader: a chunk of worker {ch['worker']} arrived when worker {w} was due "
                        "(please report this)"
                    )
                group.append(ch)
            flats = [c["arena"] if isinstance(c["arena"], np.ndarray) else c["arena"].numpy() for c in group]
            for t in range(len(group[0]["batches"])):
                pieces = [c["batches"][t] for c in group]
                if not stream.read_data:
                    x = None
                else:
                    x = merge_pieces(pieces, flats, k, self.pad_id, empty)
                    if x is None:
                        raise RuntimeError("loader: an empty micro-batch (please report this)")
                    if isinstance(x, np.ndarray) and to_tensor is not None:
                        x = to_tensor(x)
                batch: Dict[str, Any] = (
                    {f: x[i] for i, f in enumerate(stream.fields)} if x is not None else {}
                )
                lens = np.asarray([v for m in pieces for v in m["lengths"]], dtype=np.int64)
                batch["lengths"] = to_tensor(lens) if to_tensor is not None else lens
                batch["dataset"] = [v for m in pieces for v in m["datasets"]]
                batch["__key__"] = [v for m in pieces for v in m["keys"]]
                batch["epoch"] = [v for m in pieces for v in m["epochs"]]
                for w, m in enumerate(pieces):
                    for p, s in m["states"].items():
                        self._parts[p] = s
                    self._cursors[w] = m["cursor"]
                self._clock = pieces[0]["clock"]
                tokens = sum(m["tokens"] for m in pieces)
                if x is not None:
                    self._stats["padding"] += _prod(x.shape[1:]) - tokens
                self._stats["truncated"] += sum(m["truncated"] for m in pieces)
                self._stats["batches"] += 1
                yield batch

    @property
    def batches_delivered(self) -> int:
        """Micro-batches this rank's loader has handed out so far (across resumes)."""
        return int(self._clock.get("micro", 0))

    @property
    def step(self) -> int:
        """Optimizer steps completed (``micro-batches / grad_accum``, across layout changes)."""
        return int(self._clock.get("step", 0))

    def __len__(self) -> int:
        n = self.num_batches
        if n is None:
            raise TypeError("this loader is infinite (some dataset has no max_epochs)")
        return n

    @property
    def num_batches(self) -> Optional[int]:
        """Micro-batches per rank per pass when every dataset is bounded (same on every rank),
        else None. Not defined for packing or token budgets: their batch counts depend on sample
        lengths."""
        if not self.cfg.bounded or self.whole:
            return None
        return RunClock(
            self.cfg,
            self.plans,
            num_partitions=self.num_partitions,
            world_size=self.world_size,
            batch_size=self.batch_size,
            grad_accum=self.grad_accum,
            whole=False,
        ).count_to_end()

    # -- state ------------------------------------------------------------------------------
    def _identity(self) -> Dict[str, Any]:
        sh = self.cfg.shuffle
        return {
            "format": "wds_tools.loader",
            "version": STATE_VERSION,
            "partitions": self.num_partitions,
            "seed": self.seed,
            "shuffle": [sh.shards, sh.samples, sh.block_size, sh.window_blocks],
            "weight_by": self.cfg.weight_by,
            "datasets": [
                {
                    "name": p.name,
                    "num_samples": p.num_samples,
                    "fingerprint": p.fingerprint,
                    "weight": float(w),
                }
                for p, w in zip(self.plans, dataset_weights(self.cfg, self.plans, self.step))
            ],
        }

    def layout(self) -> Dict[str, Any]:
        return {
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "pack": self.pack,
            "max_tokens": self.max_tokens,
            "max_seq_len": self.max_seq_len,
            "transfer_batches": self.transfer_batches if self.num_slots > 1 else 1,
        }

    def state_dict(self) -> Dict[str, Any]:
        """This rank's part of the run's position (JSON-able): the states of its partitions and
        the run's clock. ``gather_state_dicts`` (or :func:`merge_states`) makes the whole run's."""
        return {
            **self._identity(),
            "rank": self.rank,
            "layout": self.layout(),
            "clock": json.loads(json.dumps(self._clock)),
            # every partition of this rank, None for one that has not served yet
            "parts": {
                str(p): self._parts.get(p) for p in range(self.rank, self.num_partitions, self.world_size)
            },
            "cursors": list(self._cursors),
            "stats": dict(self._stats),
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Continue from ``sd``: a rank's ``state_dict()``, every rank's (``{"ranks": [...]}`` as
        ``gather_state_dicts`` returns) or a merged run state, saved under any layout (world
        size, workers, micro-batch size, accumulation) and, within limits, another data config:
        datasets that stay continue their epoch, new ones start at epoch 0, removed ones are
        dropped, changed weights apply from here on (one log line per change)."""
        run = merge_states(sd)
        K = int(run["partitions"])
        if self._partitions_fixed and K != self.num_partitions:
            raise ValueError(
                f"loader state has {K} partitions, this loader was given partitions="
                f"{self.num_partitions}: a run keeps its partitions (drop the setting to resume)"
            )
        mine = self._identity()
        for key in ("seed", "shuffle"):
            if run.get(key) != mine[key]:
                raise ValueError(
                    f"loader state was saved with {key}={run.get(key)!r}, this loader has "
                    f"{mine[key]!r}: the canonical order depends on it; resume with the same setting"
                )
        if run.get("weight_by") != mine["weight_by"]:
            log.info(
                "data: weight_by changed from %s to %s at the resume", run.get("weight_by"), mine["weight_by"]
            )
        old = {d["name"]: d for d in run["datasets"]}
        drop: List[str] = []
        for p in self.plans:
            o = old.get(p.name)
            if o is None:
                log.info("data: dataset %r is new at this resume: it starts at epoch 0", p.name)
            elif o["fingerprint"] != p.fingerprint or o["num_samples"] != p.num_samples:
                if not p.config.restart:
                    raise ValueError(
                        f"dataset {p.name!r}: its content changed since the state was saved "
                        f"({o['num_samples']} -> {p.num_samples} samples, fingerprint "
                        f"{o['fingerprint']} -> {p.fingerprint}); set 'restart: true' on its "
                        "entry to start it over, or give it a new name"
                    )
                log.info("data: dataset %r changed and has restart: true: it starts over at epoch 0", p.name)
                drop.append(p.name)
        for name in old:
            if name not in {p.name for p in self.plans}:
                log.info("data: dataset %r is no longer in the config: dropped at this resume", name)
        old_w = {d["name"]: d.get("weight") for d in run["datasets"]}
        now_w = dataset_weights(self.cfg, self.plans, int(run["clock"].get("step", 0)))
        for p, w in zip(self.plans, now_w):
            if p.name in old_w and old_w[p.name] is not None and abs(old_w[p.name] - float(w)) > 1e-9:
                log.info("data: dataset %r weight %.4g -> %.4g from here on", p.name, old_w[p.name], float(w))
        prev = run.get("layout") or {}
        self.num_partitions = K
        self._check_layout()
        now = self.layout()
        in_step = int(run["clock"].get("in_step", 0))
        if in_step and (
            prev.get("batch_size", 0) * prev.get("world_size", 0) != self.batch_size * self.world_size
            or prev.get("grad_accum") != self.grad_accum
        ):
            raise ValueError(
                f"loader state was saved inside an optimizer step (after micro-batch {in_step} of "
                f"{prev.get('grad_accum')}): resume under the same micro-batch x world size and "
                "grad_accum, or save at a step boundary (the trainer does)"
            )
        changed = {k: (prev.get(k), now[k]) for k in now if k in prev and prev[k] != now[k]}
        if changed:
            log.info(
                "data: resuming under another layout: %s",
                ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items()),
            )
        parts: Dict[int, Dict[str, Any]] = {}
        for pi in range(self.rank, K, self.world_size):
            if str(pi) not in run["parts"] and run.get("ranks_missing"):
                raise ValueError(
                    f"loader state holds the partitions of {run['ranks_present']} rank(s) of "
                    f"{run['world_size']}; partition {pi} is missing: load the gathered state of every "
                    "rank (gather_state_dicts)"
                )
            s = run["parts"].get(str(pi))
            if s is not None:
                # only datasets of the saved config that stay unchanged carry over (a partition
                # may still hold one dropped at an earlier resume: it comes back new)
                s = dict(s, datasets={k: v for k, v in s["datasets"].items() if k in old and k not in drop})
                parts[pi] = s
        self._generation += 1
        self._parts = parts
        self._clock = dict(run["clock"])
        same = prev.get("world_size") == self.world_size and prev.get("num_workers") == self.num_workers
        cur = run.get("cursors", {}).get(str(self.rank)) if same else None
        self._cursors = list(cur) if cur and len(cur) == self.num_slots else [0] * self.num_slots
        st = run.get("stats", {}).get(str(self.rank)) if same else None
        self._stats = dict(st) if st else {"batches": 0, "padding": 0, "truncated": 0}

    def gather_state_dicts(self) -> Dict[str, Any]:
        """Every rank's state (``{"ranks": [...]}``) via ``torch.distributed``; call on all ranks.
        Needed when only rank 0 writes the checkpoint's client state (DeepSpeed ZeRO-3)."""
        sd = self.state_dict()
        if self.world_size == 1:
            return {"ranks": [sd]}
        return {"ranks": self.backend.gather(sd, self.world_size)}

    # -- stats ------------------------------------------------------------------------------
    def stats(self) -> Dict[str, Any]:
        """Per-dataset samples, tokens, epochs and skips of the batches delivered so far on this
        rank's partitions, with target and realized shares, and the padding share."""
        parts = list(self._parts.values())
        per = []
        w = dataset_weights(self.cfg, self.plans, self.step)
        for i, p in enumerate(self.plans):
            ds = [s["datasets"][p.name] for s in parts if p.name in s["datasets"]]
            rs = [d["reader"] for d in ds]
            per.append(
                {
                    "name": p.name,
                    "target_share": float(w[i]),
                    "samples": sum(d["samples"] for d in ds),
                    "tokens": sum(d["tokens"] for d in ds),
                    "epoch": max((r[0] for r in rs), default=0),
                    "skipped_shards": sum(r[2] for r in rs),
                    "skipped_samples": sum(r[3] for r in rs),
                }
            )
        ns = sum(d["samples"] for d in per) or 1
        nt = sum(d["tokens"] for d in per) or 1
        for d in per:
            d["sample_share"], d["token_share"] = d["samples"] / ns, d["tokens"] / nt
        padding = self._stats["padding"]
        real = sum(d["tokens"] for d in per)
        return {
            "rank": self.rank,
            "batches": self._stats["batches"],
            "weight_by": self.cfg.weight_by,
            "datasets": per,
            "padding_share": padding / (padding + real) if padding + real else 0.0,
            "truncated_tokens": self._stats["truncated"],
            "skipped_shards": sum(d["skipped_shards"] for d in per),
        }


def merge_states(sd: Any) -> Dict[str, Any]:
    """One run state from a rank's ``state_dict()``, ``{"ranks": [...]}``, or a merged one.

    The merged state is one small document for the whole run: the clock, and every
    partition's state (each rank owned its partitions alone)."""
    if isinstance(sd, dict) and "ranks" in sd:
        ranks = sd["ranks"]
        if not isinstance(ranks, list) or not ranks:
            raise ValueError("loader state: 'ranks' must be a non-empty list of rank states")
    else:
        ranks = [sd]
    for r in ranks:
        if not isinstance(r, dict) or r.get("format") not in ("wds_tools.loader", "wds_tools.run"):
            raise ValueError("not a wds_tools loader state")
        if r.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {r.get('version')!r} is not supported (this wds_tools writes "
                f"and reads version {STATE_VERSION}; states of version 1 were tied to one layout)"
            )
    if len(ranks) == 1 and ranks[0].get("format") == "wds_tools.run":
        return ranks[0]
    first = ranks[0]
    for r in ranks[1:]:
        for key in ("partitions", "seed", "shuffle", "layout"):
            if r.get(key) != first.get(key):
                raise ValueError(f"loader state: ranks disagree on {key} (states of different runs?)")
        if r["clock"] != first["clock"]:
            raise ValueError(
                "loader state: ranks are at different micro-batches "
                f"({first['clock'].get('micro')} vs {r['clock'].get('micro')}): save the states "
                "of all ranks after the same step"
            )
    parts: Dict[str, Any] = {}
    for r in ranks:
        parts.update(r["parts"])
    world = first["layout"]["world_size"]
    present = sorted({r.get("rank") for r in ranks})
    return {
        "format": "wds_tools.run",
        **{
            k: first[k]
            for k in ("version", "partitions", "seed", "shuffle", "weight_by", "datasets", "layout")
        },
        "clock": first["clock"],
        "parts": parts,
        "cursors": {str(r["rank"]): r["cursors"] for r in ranks if "rank" in r},
        "stats": {str(r["rank"]): r["stats"] for r in ranks if "rank" in r},
        "world_size": world,
        "ranks_present": len(present),
        "ranks_missing": len(present) < world,
    }


def default_partitions(world_size: int, num_slots: int, plans: Sequence[DatasetPlan]) -> int:
    """Canonical partitions of a new shuffled run: ``6 * world_size`` (more when a rank has more
    than 6 workers), so the run can later move to any world size that divides that (for 8
    ranks: 1, 2, 3, 4, 6, 8, 12, 16, 24, 48); fewer when a dataset is smaller than that.
    (Unshuffled streams default to one partition per reader: stored order.)"""
    per_rank = 6 * -(-num_slots // 6)
    smallest = min(p.num_samples for p in plans)
    if world_size * per_rank > smallest:
        per_rank = max(num_slots, smallest // world_size)
    return world_size * per_rank


def _dist_rank_world() -> Tuple[int, int]:
    """From an initialized ``torch.distributed`` (only if torch is already imported: the core
    never imports it), else the launcher's ``RANK``/``WORLD_SIZE``, else 0/1."""
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None) if torch is not None else None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def build_stream(
    data_config: Union[DataConfig, str],
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    batch_size: int = 1,
    num_workers: int = 0,
    max_seq_len: int = 4096,
    pad_id: int = 0,
    seed: Optional[int] = None,
    pack: bool = False,
    transfer_batches: int = 4,
    shuffle: Optional[bool] = None,
    max_epochs: Optional[int] = None,
    backend: Optional["NumpyBackend"] = None,
    io_options: wio.IOOptions = wio.DEFAULT,
    max_tokens: Optional[int] = None,
    grad_accum: int = 1,
    partitions: Optional[int] = None,
    whole_batches: bool = False,
) -> StreamingLoader:
    """The loader of one data-parallel rank, with the given backend (default: numpy, in
    process; see the module docstring). The arguments are :func:`wds_tools.loader.build_loader`'s
    (documented there), which most callers want: it picks the backend.
    """
    cfg = resolve_data_config(data_config, shuffle=shuffle, max_epochs=max_epochs)
    if rank is None or world_size is None:
        r, w = _dist_rank_world()
        rank = r if rank is None else rank
        world_size = w if world_size is None else world_size
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    for name, v, lo in (
        ("batch_size", batch_size, 1),
        ("num_workers", num_workers, 0),
        ("max_seq_len", max_seq_len, 1),
        ("transfer_batches", transfer_batches, 1),
        ("grad_accum", grad_accum, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    if pack and cfg.bounded:
        raise ValueError(
            f"{cfg.source}: packing needs an unbounded stream (remove max_epochs): "
            "packed batch counts depend on sample lengths, so ranks could disagree"
        )
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if pack:
            raise ValueError(
                "max_tokens and pack exclude each other: packing already fills "
                "batch_size rows of max_seq_len tokens (its budget)"
            )
        if cfg.bounded:
            raise ValueError(
                f"{cfg.source}: max_tokens needs an unbounded stream (remove "
                "max_epochs; stop by steps): token-budget batch counts depend on "
                "sample lengths, so ranks could disagree and ZeRO-3 would hang"
            )
    whole = pack or max_tokens is not None or whole_batches
    if whole_batches and cfg.bounded and num_workers > 1:
        raise ValueError(
            f"{cfg.source}: a bounded stream (max_epochs) with several workers each building "
            "whole batches could end at different batches on different ranks: use build_loader "
            "(its workers share every batch) or one worker"
        )
    if cfg.stratified:
        if whole:
            raise ValueError(
                f"{cfg.source}: stratified batches need fixed-size micro-batches (no pack, max_tokens)"
            )
        if cfg.bounded or any(d.max_epochs is not None for d in cfg.datasets):
            raise ValueError(f"{cfg.source}: stratified batches need unbounded datasets (no max_epochs)")
        if len(cfg.groups) > 1:
            raise ValueError(f"{cfg.source}: stratified batches need a single group")
    if partitions is not None and (
        isinstance(partitions, bool) or not isinstance(partitions, int) or partitions < 1
    ):
        raise ValueError(f"partitions must be an integer >= 1, got {partitions!r}")
    io_options = cfg.io_options(io_options)
    plans = load_plans(cfg, io_options)
    fixed = partitions if partitions is not None else cfg.partitions
    if fixed is not None:
        K = fixed
    elif not cfg.shuffle.shards and not cfg.shuffle.samples:
        K = world_size * max(1, num_workers)  # stored order: one contiguous slice per reader
    else:
        K = default_partitions(world_size, max(1, num_workers), plans)
    return StreamingLoader(
        cfg,
        plans,
        rank=rank,
        world_size=world_size,
        batch_size=batch_size,
        num_workers=num_workers,
        max_seq_len=max_seq_len,
        pad_id=pad_id,
        seed=cfg.seed if seed is None else int(seed),
        pack=pack,
        opts=io_options,
        transfer_batches=transfer_batches,
        backend=backend,
        max_tokens=max_tokens,
        grad_accum=grad_accum,
        num_partitions=K,
        partitions_fixed=fixed is not None,
        whole=whole,
    )


def iter_mixed(
    data_config: Union[DataConfig, str],
    *,
    consumer: int = 0,
    num_consumers: int = 1,
    seed: Optional[int] = None,
    max_seq_len: int = 1 << 30,
    shuffle: Optional[bool] = None,
    max_epochs: Optional[int] = None,
    io_options: wio.IOOptions = wio.DEFAULT,
) -> Iterator[Dict[str, Any]]:
    """The *mixed* sample stream of partition ``consumer`` of ``num_consumers``, uncollated:
    dicts with ``__key__``, ``dataset``, ``input_ids`` (read-only view, stored dtype) and
    ``supervised`` (spans). Groups are chosen per sample here. What a batch is built from.

    (:func:`wds_tools.reader.iter_samples` is the other one: one manifest or shard list, in
    stored order, with ``labels``.)"""
    cfg = resolve_data_config(data_config, shuffle=shuffle, max_epochs=max_epochs)
    io_options = cfg.io_options(io_options)
    plans = load_plans(cfg, io_options)
    for p in plans:
        p.check_consumers(num_consumers)
    part = Partition(
        consumer,
        num_consumers,
        plans,
        cfg,
        seed=cfg.seed if seed is None else seed,
        max_seq_len=max_seq_len,
        opts=io_options,
    )
    names, mixer = [p.name for p in plans], part.mixer
    gw = [float(sum(mixer.w[d] for d in mem)) for mem in mixer.members]
    gmix = Mixer(gw, [0] * len(gw), [None] * len(gw))
    while True:
        for g in range(len(gw)):
            gmix.caps[g] = gmix.samples[g] if not mixer.group_active(g) else None
        if not any(gmix.active(g) for g in range(len(gw))):
            return
        g = gmix.choose(0)
        gmix.account(g, 1)
        d = part.choose(g)
        key, ids, spans, _, _ = part.take(d)
        yield {"__key__": key, "dataset": names[d], "input_ids": ids, "supervised": spans}
