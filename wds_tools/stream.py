"""The stream core: mixed, sharded, shuffled, resumable batches for data-parallel training,
on numpy alone (no torch).

Planning, reading, mixing, collation and the loader's state live here. How batches leave a
rank is a *backend*: :class:`NumpyBackend` (in process, int64 arrays) here, and
``wds_tools.torch_loader.TorchBackend`` (DataLoader workers, shared-memory hand-off, tensors,
pinned memory, ``torch.distributed``) above. :func:`wds_tools.loader.build_loader` is the
front that picks one; imports run loader -> torch_loader -> stream, never back.

Each data-parallel rank runs ``num_slots = max(1, num_workers)`` consumers (one per DataLoader
worker). A consumer reads its own slice of every dataset (``mixing.EpochSlice``), picks the
dataset of every sample with the ``mixing.Mixer``, and collates batches in the worker, compact
(ids in their stored dtype, a one-byte "not a target" mask, lengths: ``collate.pad_compact``),
into one shared-memory buffer per transfer; the main process expands each batch into one
contiguous ``[k, B, T]`` int64 tensor (``collate.expand``). The DataLoader hands batches to the
main process round robin over workers; each batch carries its consumer's state, so the main
process always knows the state that reproduces exactly the batches still to come
(``state_dict``).

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
from .format import FormatError
from .mixing import DatasetPlan, EpochSlice, Mixer, dataset_weights
from .reader import Shard, load_manifest

__all__ = [
    "build_stream",
    "StreamingLoader",
    "NumpyBackend",
    "Consumer",
    "DatasetReader",
    "load_plans",
    "iter_mixed",
    "STATE_VERSION",
]

log = logging.getLogger(__name__)
STATE_VERSION = 1
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
        if self.w < self.slice.num_windows:
            self._load_window(self.w)
            self.q = pos - int(self.slice.window_start[self.w])

    def _next_window(self) -> None:
        if self.w + 1 < self.slice.num_windows:
            self.w += 1
            self.q = 0
            self._load_window(self.w)
            return
        if self._read_in_epoch == 0 and self._skipped_in_epoch >= self.slice.length:
            raise FormatError(
                f"dataset {self.plan.name!r}: a whole epoch of this reader's "
                "shards was unreadable (see the warnings above)"
            )
        self._read_in_epoch = self._skipped_in_epoch = 0
        self.bad = set()
        self._start_epoch(self.epoch + 1, 0)

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


# --- one consumer: batches -------------------------------------------------------------------


class Consumer:
    """Batches of one consumer (rank, slot); ``state()`` after any batch restores it exactly."""

    def __init__(
        self,
        plans: Sequence[DatasetPlan],
        cfg: DataConfig,
        *,
        seed: int,
        consumer: int,
        num_consumers: int,
        batch_size: int,
        max_seq_len: int,
        pad_id: int = 0,
        pack: bool = False,
        opts: wio.IOOptions = wio.DEFAULT,
        state: Optional[Dict[str, Any]] = None,
        read_data: bool = True,
        max_tokens: Optional[int] = None,
    ):
        self.plans, self.cfg, self.batch_size = plans, cfg, batch_size
        # with a token budget, a sample is truncated to min(max_seq_len, max_tokens): it must
        # fit a micro-batch on its own
        if max_tokens is not None and max_tokens < max_seq_len:
            max_seq_len = max_tokens
        self.max_seq_len, self.pad_id, self.pack = max_seq_len, pad_id, pack
        self.max_tokens = max_tokens
        self.names = [p.name for p in plans]
        groups = cfg.groups
        caps = [
            None if p.config.max_epochs is None else p.config.max_epochs * p.samples_per_epoch(num_consumers)
            for p in plans
        ]
        self.mixer = Mixer(
            list(dataset_weights(cfg, plans)),
            [groups.index(p.config.group) for p in plans],
            caps,
            min_left=1 if pack else batch_size,
        )
        self.by_tokens = cfg.weight_by == "tokens"
        st = state or {}
        rs = st.get("readers") or [None] * len(plans)
        self.readers = [
            DatasetReader(p, cfg, seed, consumer, num_consumers, opts, rs[i], read_data)
            for i, p in enumerate(plans)
        ]
        if st:
            self.mixer.load([st["units"], st["samples"]])
        self.tokens = list(st.get("tokens", [0] * len(plans)))
        self.batches = st.get("batches", 0)
        self.padding = st.get("padding", 0)
        self.truncated = st.get("truncated", 0)

    def state(self) -> Dict[str, Any]:
        units, samples = self.mixer.state()
        return {
            "batches": self.batches,
            "units": units,
            "samples": samples,
            "tokens": list(self.tokens),
            "padding": self.padding,
            "truncated": self.truncated,
            "readers": [r.state() for r in self.readers],
        }

    def _take(self, d: int):
        s = self.readers[d].take()
        n = s[3] if s[3] < self.max_seq_len else self.max_seq_len
        self.mixer.account(d, n if self.by_tokens else 1)
        self.tokens[d] += n
        return s

    def next_samples(self) -> Optional[Tuple[List[int], List[tuple], Optional[List[List[int]]]]]:
        """(dataset of each sample, samples, packing rows or None); None at the end."""
        g = self.mixer.choose_group()
        if g < 0:
            return None
        if self.max_tokens is not None:
            return self._budget_samples(g)
        choose, take, ds, got = self.mixer.choose, self._take, [], []
        if not self.pack:
            for _ in range(self.batch_size):
                d = choose(g)
                ds.append(d)
                got.append(take(d))
            return ds, got, None
        rows: List[List[int]] = [[]]
        used, L = 0, self.max_seq_len
        while True:
            d = choose(g)
            n = min(self.readers[d].peek()[3], L)
            if used + n > L:
                if len(rows) == self.batch_size:
                    break
                rows.append([])
                used = 0
            rows[-1].append(len(got))
            ds.append(d)
            got.append(take(d))
            used += n
            if not self.mixer.group_active(g):
                break
        return ds, got, rows

    def _budget_samples(self, g: int) -> Tuple[List[int], List[tuple], None]:
        """Samples of one token-budget micro-batch of group ``g``: consecutive samples of the
        stream while the padded batch (rows x longest row, after truncation) stays within
        ``max_tokens`` and the rows within ``batch_size``. The sample that does not fit is
        only peeked, so it opens the next batch (and ``state()`` still points before it)."""
        choose, take, readers, mixer = self.mixer.choose, self._take, self.readers, self.mixer
        budget, cap, rows = self.max_tokens, self.max_seq_len, self.batch_size
        assert budget is not None
        ds: List[int] = []
        got: List[tuple] = []
        longest = 0
        while len(got) < rows:
            d = choose(g)
            n = readers[d].peek()[3]
            if n > cap:
                n = cap
            if n < longest:
                n = longest
            if got and (len(got) + 1) * n > budget:
                break
            ds.append(d)
            got.append(take(d))
            longest = n
            if not mixer.group_active(g):
                break
        return ds, got, None

    def next_plan(self) -> Optional[Dict[str, Any]]:
        """The next batch's samples and its exact ``[k, B, T]`` shape (not yet collated); the
        counters (and so ``state()``) already include it. None at the end of the stream."""
        nxt = self.next_samples()
        if nxt is None:
            return None
        ds, got, rows = nxt
        ids = [s[1] for s in got]
        lens = [s[3] if s[3] < self.max_seq_len else self.max_seq_len for s in got]
        if rows is None:
            row_lens = lens
            shape = (len(PAD_FIELDS), len(lens), max(lens))
        else:
            row_lens = [sum(lens[i] for i in r) for r in rows]
            shape = (len(PACK_FIELDS), len(rows), max(row_lens))
        self.batches += 1
        self.padding += shape[1] * shape[2] - sum(lens)
        self.truncated += sum(s[3] for s in got) - sum(lens)
        return {
            "datasets": ds,
            "keys": [s[0] for s in got],
            "ids": ids,
            "spans": [s[2] for s in got],
            "rows": rows,
            "shape": shape,
            "lengths": row_lens,
        }

    def collate(self, plan: Dict[str, Any], alloc=None) -> np.ndarray:
        """The ``[k, B, T]`` int64 array of a planned batch (memory from ``alloc(shape)``)."""
        if plan["rows"] is None:
            arr, _ = pad_batch(plan["ids"], plan["spans"], self.max_seq_len, self.pad_id, alloc)
        else:
            arr, _ = pack_batch(
                plan["ids"], plan["spans"], plan["rows"], self.max_seq_len, self.pad_id, alloc
            )
        assert arr.shape == plan["shape"], (arr.shape, plan["shape"])
        return arr

    def collate_compact(self, plan: Dict[str, Any], arrays: Dict[str, np.ndarray]) -> None:
        """Fill the compact arrays (``collate.compact_layout``) of a planned batch."""
        if plan["rows"] is None:
            pad_compact(plan["ids"], plan["spans"], self.max_seq_len, arrays)
        else:
            pack_compact(plan["ids"], plan["spans"], plan["rows"], self.max_seq_len, arrays)


# --- batches of one rank: chunks of a slot, expanded in the consuming process ----------------


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
        n = int(np.prod(shape)) * dtype.itemsize
        self.used = off + _align(n)
        return off, self.flat[off : off + n].view(dtype).reshape(shape)

    def __call__(self, shape):  # an int64 [k, B, T] batch (``Consumer.collate``'s alloc)
        return self.take(shape, np.int64)[1]


def _align(n: int) -> int:
    return (n + 7) // 8 * 8


def _carve(flat: np.ndarray, off: int, shape, dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    return flat[off : off + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)


class _SlotStream:
    """The picklable per-rank description a worker turns into its consumer's batches."""

    def __init__(self, loader: "StreamingLoader"):
        self.plans, self.cfg, self.seed = loader.plans, loader.cfg, loader.seed
        self.rank, self.num_slots = loader.rank, loader.num_slots
        self.first_slot, self.chunk_pos = loader._next_slot, loader._chunk_pos
        self.num_consumers = loader.world_size * loader.num_slots
        self.transfer = loader.transfer_batches if loader.num_slots > 1 else 1
        self.batch_size, self.max_seq_len = loader.batch_size, loader.max_seq_len
        self.pad_id, self.pack, self.opts = loader.pad_id, loader.pack, loader.opts
        self.max_tokens = loader.max_tokens
        self.slot_states = list(loader._slots)
        self.fields = PACK_FIELDS if loader.pack else PAD_FIELDS

    def consumer(self, slot: int, state: Optional[Dict[str, Any]] = None) -> Consumer:
        return Consumer(
            self.plans,
            self.cfg,
            seed=self.seed,
            consumer=self.rank * self.num_slots + slot,
            num_consumers=self.num_consumers,
            state=state,
            batch_size=self.batch_size,
            max_seq_len=self.max_seq_len,
            pad_id=self.pad_id,
            pack=self.pack,
            opts=self.opts,
            max_tokens=self.max_tokens,
        )

    def chunks(self, worker: int, shared_buffer: Optional[Any] = None) -> Iterator[Dict[str, Any]]:
        """Chunks of up to ``transfer`` batches of worker ``worker``'s slot (the first chunk of
        the slot that was interrupted mid-turn is shorter, so the turn order is kept).

        ``shared_buffer`` (given in a DataLoader worker: ``nbytes -> buffer``): batches travel
        compact (``collate.pad_compact``/``pack_compact``: about 3 bytes per token instead of
        24) in one shared-memory buffer and are expanded to int64 in the consuming process
        (``batches``): filling fresh shared memory costs the worker about its size in page
        faults. In process they are collated to int64 directly."""
        slot = (worker + self.first_slot) % self.num_slots
        c = self.consumer(slot, self.slot_states[slot])
        names = c.names
        pack = self.pack
        compact = shared_buffer is not None
        n = self.transfer - (self.chunk_pos if worker == 0 else 0)
        while True:
            plans, states = [], []
            for _ in range(n):
                plan = c.next_plan()
                if plan is None:
                    break
                plans.append(plan)
                states.append(c.state())
            if plans:
                if shared_buffer is not None:
                    layouts = [compact_layout(p["ids"], p["shape"], pack) for p in plans]
                    nbytes = sum(
                        _align(int(np.prod(sh)) * dt.itemsize) for lay in layouts for _, sh, dt in lay
                    )
                    arena = _Arena(nbytes, shared_buffer(nbytes))
                else:
                    arena = _Arena(sum(int(np.prod(p["shape"])) * 8 for p in plans))
                metas = []
                for bi, (plan, state) in enumerate(zip(plans, states)):
                    piece: Tuple[Any, Any]
                    if compact:
                        where, arrays = [], {}
                        for name, sh, dt in layouts[bi]:
                            off, arrays[name] = arena.take(sh, dt)
                            where.append((name, off, sh, dt.str))
                        c.collate_compact(plan, arrays)
                        piece = (plan["shape"], where)
                    else:
                        piece = (plan["shape"], arena.used)
                        c.collate(plan, arena)
                    metas.append(
                        (piece, [names[d] for d in plan["datasets"]], plan["keys"], plan["lengths"], state)
                    )
                yield {"slot": slot, "arena": arena.buffer, "batches": metas, "compact": compact}
            if len(plans) < n:
                return
            n = self.transfer

    def batches(self, chunks: Iterator[Dict[str, Any]], backend: "NumpyBackend") -> Iterator[tuple]:
        """(slot, batch dict, state after it, last of its chunk) in the consuming process, as
        the backend's arrays (int64 numpy arrays, or tensors: views of the arena, or freshly
        expanded into the backend's memory, pinned if it says so)."""
        fields, pad_id = self.fields, self.pad_id
        to_tensor, empty = backend.as_output, backend.empty_int64
        for ch in chunks:
            buf = ch["arena"]
            flat = buf if isinstance(buf, np.ndarray) else buf.numpy()
            last = len(ch["batches"]) - 1
            for i, ((shape, where), ds, keys, lengths, state) in enumerate(ch["batches"]):
                if ch["compact"]:
                    if empty is not None:
                        x = empty(shape)
                        expand(
                            {name: _carve(flat, off, sh, dt) for name, off, sh, dt in where},
                            pad_id,
                            x.numpy(),
                        )
                    else:
                        x = expand({name: _carve(flat, off, sh, dt) for name, off, sh, dt in where}, pad_id)
                else:
                    x = _carve(flat, where, shape, np.int64)
                    if to_tensor is not None:
                        x = to_tensor(x)
                batch = {f: x[k] for k, f in enumerate(fields)}
                lens = np.asarray(lengths, dtype=np.int64)
                batch["lengths"] = to_tensor(lens) if to_tensor is not None else lens
                batch["dataset"], batch["__key__"] = ds, keys
                yield ch["slot"], batch, state, i == last


class NumpyBackend:
    """Batches as int64 numpy arrays, read in this process (no DataLoader workers, no torch).

    A backend answers four questions for :class:`StreamingLoader`: where chunks come from
    (``chunks``), what a batch plane becomes (``as_output``), where an expanded compact batch
    is written (``empty_int64``: None = a fresh numpy array), and how states of all ranks are
    gathered (``gather``)."""

    name = "numpy"
    empty_int64: Any = None

    def chunks(self, stream: _SlotStream, num_workers: int) -> Iterator[Dict[str, Any]]:
        if num_workers:
            raise ValueError(
                "DataLoader workers need torch: pip install torch, or use "
                "num_workers=0 (reads in this process)"
            )
        return stream.chunks(0)

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


class StreamingLoader:
    """Iterable of batches for one data-parallel rank; see ``build_loader``.

    Iterating starts the workers from the current state, so breaking out of a loop and
    iterating again continues exactly where the last delivered batch left off.
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
    ):
        self.cfg, self.plans = cfg, plans
        self.rank, self.world_size = rank, world_size
        self.batch_size, self.num_workers = batch_size, num_workers
        self.num_slots = max(1, num_workers)
        self.max_seq_len, self.pad_id, self.seed, self.pack = max_seq_len, pad_id, seed, pack
        self.opts, self.transfer_batches = opts, transfer_batches
        self.max_tokens = max_tokens
        self.backend = backend if backend is not None else NumpyBackend()
        self.weights = dataset_weights(cfg, plans)
        self._slots: List[Optional[Dict[str, Any]]] = [None] * self.num_slots
        self._next_slot = 0
        self._chunk_pos = 0  # batches of the current slot's turn already delivered
        self._generation = 0  # bumped by every __iter__ and load_state_dict

    # -- iteration --------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Dict[str, Any]]:
        self._generation += 1
        gen = self._generation
        stream = _SlotStream(self)
        # with workers, batches arrive compact and are expanded here (``_SlotStream.batches``)
        chunks = self.backend.chunks(stream, self.num_workers)
        for slot, batch, state, last in stream.batches(chunks, self.backend):
            if gen != self._generation:
                raise RuntimeError(
                    "this loader was iterated again (or given a state) after this iterator "
                    "started: only the newest iterator continues the stream (it starts where "
                    "the last delivered batch left off)"
                )
            if slot != self._next_slot:  # workers deliver in turn order; never expected
                raise RuntimeError(
                    f"loader: a batch of worker slot {slot} arrived when slot "
                    f"{self._next_slot} was due (please report this)"
                )
            self._slots[slot] = state
            self._chunk_pos += 1
            if last:  # a worker's turn is one chunk (short ones: resumed mid-turn, or the end)
                self._chunk_pos = 0
                self._next_slot = (slot + 1) % self.num_slots
            yield batch

    @property
    def batches_delivered(self) -> int:
        """Batches this rank's loader has handed out so far (across resumes)."""
        return sum(s["batches"] for s in self._slots if s is not None)

    def __len__(self) -> int:
        n = self.num_batches
        if n is None:
            raise TypeError("this loader is infinite (some dataset has no max_epochs)")
        return n

    @property
    def num_batches(self) -> Optional[int]:
        """Batches per rank per pass when every dataset is bounded (same on every rank), else None.
        Not defined for packing or token budgets: their batch counts depend on sample lengths."""
        if not self.cfg.bounded or self.pack or self.max_tokens is not None:
            return None
        c = self.world_size * self.num_slots
        total = 0
        for g in self.cfg.groups:
            left = sum(
                (p.config.max_epochs or 0) * p.samples_per_epoch(c) for p in self.plans if p.config.group == g
            )
            total += left // self.batch_size
        return total * self.num_slots

    # -- state ------------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """This rank's position: a few integers per worker slot and dataset (JSON-able)."""
        return {
            "format": "wds_tools.loader",
            "version": STATE_VERSION,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_slots": self.num_slots,
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
            "pack": self.pack,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "weight_by": self.cfg.weight_by,
            "datasets": [p.name for p in self.plans],
            "num_samples": [p.num_samples for p in self.plans],
            "transfer_batches": self.transfer_batches if self.num_slots > 1 else 1,
            "next_slot": self._next_slot,
            "chunk_pos": self._chunk_pos,
            "slots": json.loads(json.dumps(self._slots)),
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        """Continue from ``sd`` (this rank's ``state_dict()``, or ``{"ranks": [sd_0, sd_1, ...]}``
        as gathered by ``gather_state_dicts``). Refuses a state of another layout."""
        if isinstance(sd, dict) and "ranks" in sd:
            ranks = sd["ranks"]
            if len(ranks) != self.world_size:
                raise ValueError(
                    f"loader state holds {len(ranks)} ranks, this run has world size "
                    f"{self.world_size} (the data layout depends on it)"
                )
            sd = ranks[self.rank]
        if not isinstance(sd, dict) or sd.get("format") != "wds_tools.loader":
            raise ValueError("not a wds_tools loader state")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {sd.get('version')!r} is not supported "
                f"(this wds_tools writes and reads version {STATE_VERSION})"
            )
        mine = self.state_dict()
        for k in (
            "rank",
            "world_size",
            "num_slots",
            "transfer_batches",
            "batch_size",
            "max_seq_len",
            "pack",
            "max_tokens",
            "seed",
            "weight_by",
            "datasets",
            "num_samples",
        ):
            if sd.get(k) != mine[k]:
                hint = " (num_workers)" if k == "num_slots" else ""
                raise ValueError(
                    f"loader state was saved with {k}{hint}={sd.get(k)!r}, this "
                    f"loader has {mine[k]!r}; resume with the same setting"
                )
        if len(sd["slots"]) != self.num_slots or not 0 <= sd["next_slot"] < self.num_slots:
            raise ValueError("loader state: malformed slots")
        self._generation += 1
        self._slots = [None if s is None else dict(s) for s in sd["slots"]]
        self._next_slot = int(sd["next_slot"])
        self._chunk_pos = int(sd["chunk_pos"])

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
        rank, with target and realized shares, and the padding share."""
        slots = [s for s in self._slots if s is not None]
        per = []
        for i, p in enumerate(self.plans):
            samples = sum(s["samples"][i] for s in slots)
            tokens = sum(s["tokens"][i] for s in slots)
            rs = [s["readers"][i] for s in slots]
            per.append(
                {
                    "name": p.name,
                    "target_share": float(self.weights[i]),
                    "samples": samples,
                    "tokens": tokens,
                    "epoch": max((r[0] for r in rs), default=0),
                    "skipped_shards": sum(r[2] for r in rs),
                    "skipped_samples": sum(r[3] for r in rs),
                }
            )
        ns = sum(d["samples"] for d in per) or 1
        nt = sum(d["tokens"] for d in per) or 1
        for d in per:
            d["sample_share"], d["token_share"] = d["samples"] / ns, d["tokens"] / nt
        padding = sum(s["padding"] for s in slots)
        real = sum(sum(s["tokens"]) for s in slots)
        return {
            "rank": self.rank,
            "batches": sum(s["batches"] for s in slots),
            "weight_by": self.cfg.weight_by,
            "datasets": per,
            "padding_share": padding / (padding + real) if padding + real else 0.0,
            "truncated_tokens": sum(s["truncated"] for s in slots),
            "skipped_shards": sum(d["skipped_shards"] for d in per),
        }


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
    ):
        if not isinstance(v, int) or v < lo:
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
    io_options = cfg.io_options(io_options)
    plans = load_plans(cfg, io_options)
    consumers = world_size * max(1, num_workers)
    for p in plans:
        p.check_consumers(consumers)
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
    """The *mixed* sample stream of one consumer of a data config, uncollated: dicts with
    ``__key__``, ``dataset``, ``input_ids`` (read-only view, stored dtype) and ``supervised``
    (spans). Groups are chosen per sample here. What a batch is built from.

    (:func:`wds_tools.reader.iter_samples` is the other one: one manifest or shard list, in
    stored order, with ``labels``.)"""
    cfg = resolve_data_config(data_config, shuffle=shuffle, max_epochs=max_epochs)
    io_options = cfg.io_options(io_options)
    plans = load_plans(cfg, io_options)
    for p in plans:
        p.check_consumers(num_consumers)
    c = Consumer(
        plans,
        cfg,
        seed=cfg.seed if seed is None else seed,
        consumer=consumer,
        num_consumers=num_consumers,
        batch_size=1,
        max_seq_len=max_seq_len,
        opts=io_options,
    )
    names, mixer, take = c.names, c.mixer, c._take
    while True:
        g = mixer.choose_group()
        if g < 0:
            return
        d = mixer.choose(g)
        key, ids, spans, _ = take(d)
        yield {"__key__": key, "dataset": names[d], "input_ids": ids, "supervised": spans}
