"""Deterministic planning of the stream: who reads which samples, in which order, from which
dataset. Pure arithmetic over the manifests' per-shard counts; nothing here reads a shard.

Vocabulary:

- **partition**: one of the run's ``K`` canonical partitions (fixed when the run starts, not tied
  to ranks or workers: rank ``r`` of ``W`` serves partitions ``p % W == r``). Every partition
  reads its own part of every dataset. (``consumer`` below is a partition.)
- **epoch slice**: in epoch ``e`` of a dataset, the shards are put in a seeded order, their
  samples seen as one sequence of ``N`` samples, cut into ``C = K`` contiguous slices of
  ``L = N // C`` samples; partition ``c`` owns slice ``c``. The last ``N % C`` samples of the
  sequence (a different set each epoch) are the only ones not read in that epoch.
- **block**: up to ``block_size`` consecutive samples of one shard (one sequential read);
  **window**: ``window_blocks`` consecutive blocks of the seeded block order, whose samples are
  shuffled together. A consumer's slice is read window after window.
- **mixer**: picks the dataset of every sample by the largest deficit ``T_i + w_i - U_i``, where
  ``U_i`` counts the units (samples or tokens) taken and ``T_i`` integrates the target share
  over the units taken (``w_i * U`` for fixed weights), so every prefix of the stream is within
  about one sample (or one sample's tokens) of the weights, and a weight schedule is followed
  as it moves. Seeds use a stable hash of the dataset's *name*, so adding or removing datasets
  never reshuffles the others.
"""

from __future__ import annotations

import hashlib
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .config import DataConfig, DatasetConfig, ShuffleConfig

__all__ = ["DatasetPlan", "EpochSlice", "Mixer", "rng_for", "dataset_weights", "name_key"]

# tags that keep the seed streams of different decisions apart
_SHARDS, _BLOCKS, _WINDOW = 1, 2, 3


def rng_for(*words: int) -> np.random.Generator:
    """A generator that is a pure function of ``words`` (seed, dataset, epoch, ...)."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(w) for w in words])))


def name_key(name: str) -> int:
    """A stable 32-bit number of a dataset name (its seed word)."""
    return zlib.crc32(name.encode("utf-8"))


@dataclass
class DatasetPlan:
    """What planning needs from one manifest: shard URLs and per-shard counts (no indexes)."""

    index: int  # position in the config (part of every seed)
    config: DatasetConfig
    urls: List[str]
    index_urls: List[str]
    shard_samples: np.ndarray  # int64 [num_shards]
    shard_tokens: np.ndarray  # int64 [num_shards]
    num_samples: int
    num_tokens: int
    fingerprint: str = ""  # of the content: shard checksums (or file names) and counts

    @classmethod
    def from_manifest(cls, index: int, config: DatasetConfig, manifest: Dict[str, Any]) -> "DatasetPlan":
        shards = manifest["shards"]
        return cls(
            index=index,
            config=config,
            urls=[s["url"] for s in shards],
            index_urls=[s["index_url"] for s in shards],
            shard_samples=np.array([s["num_samples"] for s in shards], dtype=np.int64),
            shard_tokens=np.array([s["num_tokens"] for s in shards], dtype=np.int64),
            num_samples=int(manifest["num_samples"]),
            num_tokens=int(manifest["num_tokens"]),
            fingerprint=_fingerprint(shards),
        )

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def key(self) -> int:
        """Seed word of this dataset (its name's, not its position's)."""
        return name_key(self.config.name)

    @property
    def mean_tokens(self) -> float:
        return self.num_tokens / max(1, self.num_samples)

    def samples_per_epoch(self, num_consumers: int) -> int:
        """``L``: samples each consumer reads per epoch of this dataset."""
        return self.num_samples // num_consumers

    def check_consumers(self, num_consumers: int) -> None:
        if self.samples_per_epoch(num_consumers) < 1:
            raise ValueError(
                f"dataset {self.name!r} has {self.num_samples} samples, fewer than the run's "
                f"{num_consumers} partitions (each reads at least one per epoch): use a bigger "
                "dataset, or fewer partitions (partitions: N) when a run starts"
            )


class EpochSlice:
    """The ordered samples of one consumer in one epoch of one dataset.

    Position ``p`` in ``[0, length)`` maps to ``(shard, sample index)`` through
    ``window_of(p)`` and ``window(w)``; only a few small arrays per epoch are kept.
    """

    def __init__(
        self,
        plan: DatasetPlan,
        shuffle: ShuffleConfig,
        seed: int,
        epoch: int,
        consumer: int,
        num_consumers: int,
    ):
        self.plan, self.shuffle, self.seed, self.epoch = plan, shuffle, seed, epoch
        self.consumer = consumer
        counts = plan.shard_samples
        if shuffle.shards:
            order = rng_for(seed, plan.key, epoch, _SHARDS).permutation(len(counts))
        else:
            order = np.arange(len(counts))
        cum = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(counts[order], out=cum[1:])
        self.length = length = plan.samples_per_epoch(num_consumers)
        lo, hi = consumer * length, (consumer + 1) * length
        j = np.arange(np.searchsorted(cum, lo, "right") - 1, np.searchsorted(cum, hi, "left"))
        starts = np.maximum(lo - cum[j], 0)
        stops = np.minimum(hi - cum[j], counts[order[j]])
        keep = stops > starts
        starts, stops, shards = starts[keep], stops[keep], order[j][keep]
        bs = shuffle.block_size
        nb = (stops - starts + bs - 1) // bs
        seg = np.repeat(np.arange(len(nb)), nb)
        k = np.arange(int(nb.sum())) - np.repeat(np.cumsum(nb) - nb, nb)
        b_start = starts[seg] + k * bs
        b_len = np.minimum(bs, stops[seg] - b_start)
        b_shard = shards[seg]
        if shuffle.samples:
            perm = rng_for(seed, plan.key, epoch, _BLOCKS, consumer).permutation(len(b_len))
            b_start, b_len, b_shard = b_start[perm], b_len[perm], b_shard[perm]
        self.block_shard, self.block_start, self.block_len = b_shard, b_start, b_len
        wb = shuffle.window_blocks
        firsts = np.arange(0, len(b_len), wb)
        sizes = np.add.reduceat(b_len, firsts) if len(b_len) else np.zeros(0, np.int64)
        self.window_start = np.zeros(len(firsts) + 1, dtype=np.int64)
        np.cumsum(sizes, out=self.window_start[1:])
        assert self.window_start[-1] == length, (self.window_start[-1], length)
        self.num_windows = len(firsts)

    def window_of(self, pos: int) -> int:
        return int(np.searchsorted(self.window_start, pos, "right") - 1)

    def window(self, w: int):
        """(blocks, order) of window ``w``: ``blocks`` is a list of (shard, start, length);
        ``order[q]`` is the index, in the window's concatenated blocks, of its ``q``-th sample."""
        wb = self.shuffle.window_blocks
        sl = slice(w * wb, (w + 1) * wb)
        blocks = list(
            zip(self.block_shard[sl].tolist(), self.block_start[sl].tolist(), self.block_len[sl].tolist())
        )
        size = int(self.window_start[w + 1] - self.window_start[w])
        if self.shuffle.samples:
            order = (
                rng_for(self.seed, self.plan.key, self.epoch, _WINDOW, self.consumer, w)
                .permutation(size)
                .tolist()
            )
        else:
            order = list(range(size))
        return blocks, order

    def samples(self) -> List[tuple]:
        """Every (shard, index) of the slice in stream order (for tests and dry runs)."""
        out: List[tuple] = []
        for w in range(self.num_windows):
            blocks, order = self.window(w)
            flat = [(s, a + i) for s, a, n in blocks for i in range(n)]
            out.extend(flat[q] for q in order)
        return out


def _fingerprint(shards: Sequence[Dict[str, Any]]) -> str:
    """What identifies a dataset's content across moves: per shard its sha256 (or file name)
    and counts, in order."""
    h = hashlib.sha256()
    h.update("\n".join(s.get("sha256") or str(s["url"]).rsplit("/", 1)[-1] for s in shards).encode())
    h.update(np.array([[s["num_samples"], s["num_tokens"]] for s in shards], dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def dataset_weights(cfg: DataConfig, plans: Sequence[DatasetPlan], step: float = 0) -> np.ndarray:
    """Normalized target shares (of samples or of tokens, as ``cfg.weight_by`` says) at
    optimizer step ``step`` (weights may be schedules).

    A dataset with a ``ratio`` (the reference's ``META`` form) weighs ``ratio`` times its size
    (samples, or tokens when weighting by tokens)."""
    w = np.asarray(raw_weights(cfg, plans, step), dtype=np.float64)
    if not w.sum() > 0:
        raise ValueError(f"{cfg.source}: all dataset weights are zero at step {step:g}")
    return w / w.sum()


def raw_weights(cfg: DataConfig, plans: Sequence[DatasetPlan], step: float = 0) -> List[float]:
    """Unnormalized weights at ``step`` (``ratio`` resolved against the manifest sizes)."""
    raw: List[float] = []
    for p in plans:
        if p.config.ratio is not None:
            size = p.num_tokens if cfg.weight_by == "tokens" else p.num_samples
            raw.append(p.config.ratio * size)
        else:
            raw.append(p.config.weight_at(step))
    return raw


class Mixer:
    """Largest-deficit interleave over datasets, with groups that never share a batch.

    ``choose(g)`` is called once per sample of group ``g``, ``account(d, u)`` after each sample
    with its units (1 in sample mode, its tokens in token mode). ``targets`` integrate each
    dataset's share of its group over the units taken, so ``set_weights`` (a schedule) moves the
    target from then on without a catch-up burst. Datasets with a ``cap`` (``max_epochs * L``
    samples) leave the mixture when it is reached. ``choose_group`` (batch by batch, when the
    mixer is used over groups) follows the same rule with one unit per batch.

    State: per-dataset ``units``, ``samples`` and ``targets``; everything else is derived.
    """

    def __init__(
        self,
        weights: Sequence[float],
        groups: Sequence[int],
        caps: Sequence[Optional[int]],
        min_left: int = 1,
    ):
        self.w = [float(x) for x in weights]
        self.group_of = list(groups)
        self.caps = list(caps)
        self.min_left = min_left
        self.num_groups = max(self.group_of) + 1
        self.members = [[d for d, g in enumerate(self.group_of) if g == gi] for gi in range(self.num_groups)]
        self.units: List[float] = [0] * len(self.w)
        self.samples: List[int] = [0] * len(self.w)
        self.targets: List[float] = [0.0] * len(self.w)

    def set_weights(self, weights: Sequence[float]) -> None:
        self.w = [float(x) for x in weights]

    def active(self, d: int) -> bool:
        cap = self.caps[d]
        return cap is None or self.samples[d] < cap

    def group_left(self, g: int) -> Optional[int]:
        """Samples left in group ``g`` (None: unbounded)."""
        left = 0
        for d in self.members[g]:
            cap = self.caps[d]
            if cap is None:
                return None
            left += cap - self.samples[d]
        return left

    def group_active(self, g: int) -> bool:
        left = self.group_left(g)
        return left is None or left >= self.min_left

    def _shares(self, g: int) -> List[tuple]:
        w = self.w
        act = [d for d in self.members[g] if self.active(d) and w[d] > 0]
        if not act:  # all weights zero right now: fall back to the active members, equally
            act = [d for d in self.members[g] if self.active(d)]
            return [(d, 1.0 / len(act)) for d in act] if act else []
        wsum = sum(w[d] for d in act)
        return [(d, w[d] / wsum) for d in act]

    def choose(self, g: int) -> int:
        """The dataset of the next sample of group ``g`` (which must be active)."""
        members = self.members[g]
        if len(members) == 1:
            return members[0]
        units, targets = self.units, self.targets
        best, best_score = -1, 0.0
        for d, share in self._shares(g):
            score = targets[d] + share - units[d]
            if best < 0 or score > best_score:
                best, best_score = d, score
        return best

    def account(self, d: int, units: float, real: bool = True) -> None:
        """Count ``units`` taken from ``d`` (``real=False``: a phase offset, no sample)."""
        g = self.group_of[d]
        if len(self.members[g]) > 1:
            for e, share in self._shares(g):
                self.targets[e] += share * units
        self.units[d] += units
        if real:
            self.samples[d] += 1

    def choose_group(self) -> int:
        """The group of the next batch; -1 when every group is exhausted (end of stream)."""
        if self.num_groups == 1:
            return 0 if self.group_active(0) else -1
        best, best_score = -1, 0.0
        total = sum(self.units)
        for g in range(self.num_groups):
            if not self.group_active(g):
                continue
            wg = sum(self.w[d] for d in self.members[g] if self.active(d))
            ug = sum(self.units[d] for d in self.members[g])
            score = wg * (total + 1) - ug
            if best < 0 or score > best_score:
                best, best_score = g, score
        return best

    def state(self) -> List[List[Any]]:
        return [list(self.units), list(self.samples), list(self.targets)]

    def load(self, state: Sequence[Sequence[Any]]) -> None:
        self.units, self.samples = list(state[0]), list(state[1])
        if len(state) > 2:
            self.targets = [float(x) for x in state[2]]
        else:
            self.targets = [0.0] * len(self.units)
            for g in range(self.num_groups):
                ug = sum(self.units[d] for d in self.members[g])
                for d, share in self._shares(g):
                    self.targets[d] = share * ug
