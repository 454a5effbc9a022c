"""A synthetic batch source that follows the ``wds_tools.loader`` contract (tests, benchmarks).

Batch ``k`` of rank ``r`` is a pure function of ``(seed, r, k mod num_distinct)``: with a small
``num_distinct`` it is a small repeated set a model can fit, and its state is one integer, so a
restarted source continues exactly.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

__all__ = ["SyntheticLoader"]


class SyntheticLoader:
    """Random token batches: ``input_ids``, ``labels``, ``attention_mask``, ``dataset``, ``__key__``.

    Samples have random lengths in ``[min_len, seq_len]`` (right-padded with ``pad_id``), an
    unsupervised prompt of ``prompt_len`` tokens, ids in ``[min_token, vocab_size)``, and alternate
    between ``datasets`` names.
    """

    def __init__(
        self,
        vocab_size: int,
        batch_size: int,
        seq_len: int,
        *,
        rank: int = 0,
        seed: int = 0,
        num_distinct: int = 0,
        min_len: int = 0,
        prompt_len: int = 2,
        pad_id: int = 0,
        datasets: Sequence[str] = ("synthetic_a", "synthetic_b"),
        min_token: int = 1,
    ) -> None:
        self.vocab_size, self.batch_size, self.seq_len = vocab_size, batch_size, seq_len
        self.rank, self.seed, self.num_distinct = rank, seed, num_distinct
        self.min_len = min_len or seq_len
        self.prompt_len, self.pad_id, self.datasets = prompt_len, pad_id, list(datasets)
        self.min_token = min_token
        self.next_index = 0

    def batch(self, index: int) -> dict:
        key = index % self.num_distinct if self.num_distinct else index
        g = torch.Generator().manual_seed((self.seed * 7919 + self.rank) * 1_000_003 + key)
        b, t = self.batch_size, self.seq_len
        ids = torch.randint(self.min_token, self.vocab_size, (b, t), generator=g)
        lengths = torch.randint(self.min_len, t + 1, (b,), generator=g)
        mask = (torch.arange(t)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, self.pad_id)
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, : self.prompt_len] = -100
        names = [self.datasets[(key * b + i) % len(self.datasets)] for i in range(b)]
        keys = [f"{self.rank}-{key}-{i}" for i in range(b)]
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "dataset": names, "__key__": keys}

    def __iter__(self) -> Iterator[dict]:
        while True:
            batch = self.batch(self.next_index)
            self.next_index += 1
            yield batch

    def state_dict(self) -> dict:
        return {"version": 1, "next_index": self.next_index}

    def gather_state_dicts(self) -> dict:
        """Every rank's state (``{"ranks": [...]}``), as ``wds_tools``' loader gathers it; a
        collective when a process group of more than one rank is up."""
        sd = self.state_dict()
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return {"ranks": [sd]}
        out: list = [None] * dist.get_world_size()
        dist.all_gather_object(out, sd)
        return {"ranks": out}

    def load_state_dict(self, state: dict) -> None:
        """Continue from this rank's ``state_dict()`` or a gathered ``{"ranks": [...]}``."""
        if "ranks" in state:
            state = state["ranks"][self.rank]
        if state.get("version") != 1:
            raise ValueError(f"unknown SyntheticLoader state version {state.get('version')}")
        self.next_index = int(state["next_index"])


class MixedLengthLoader:
    """A mixture of short and long random samples, padded or packed (benchmarks, tests).

    Sample ``i`` is a pure function of ``(seed, rank, i)``: with probability ``long_share`` a
    long one (``long_len`` tokens, an image-generation item's size), else a short one
    (``short_len``, a chat turn's); its first ``prompt_len`` tokens are not targets. Padded
    batches hold ``batch_size`` samples; packed ones ``batch_size`` rows of up to ``seq_len``
    tokens, filled in order (``wds_tools.collate.pack_batch``, the loader's layout). The state is
    the next sample's index, so a restarted source continues exactly.
    """

    def __init__(
        self,
        vocab_size: int,
        batch_size: int,
        seq_len: int,
        *,
        pack: bool,
        rank: int = 0,
        seed: int = 0,
        short_len: tuple = (60, 300),
        long_len: tuple = (1024, 2400),
        long_share: float = 0.5,
        prompt_len: int = 8,
        min_token: int = 1,
    ) -> None:
        self.vocab_size, self.batch_size, self.seq_len, self.pack = (vocab_size, batch_size, seq_len, pack)
        self.rank, self.seed, self.short_len, self.long_len = rank, seed, short_len, long_len
        self.long_share, self.prompt_len, self.min_token = long_share, prompt_len, min_token
        self.next_sample = 0

    def sample(self, i: int):
        """(token ids, supervised spans) of sample ``i``."""
        import numpy as np

        rng = np.random.default_rng([self.seed, self.rank, i])
        lo, hi = self.long_len if rng.random() < self.long_share else self.short_len
        n = min(int(rng.integers(lo, hi + 1)), self.seq_len)
        ids = rng.integers(self.min_token, self.vocab_size, n).astype(np.int64)
        return ids, [(min(self.prompt_len, n - 1), n)]

    def _next_batch(self) -> dict:
        from wds_tools.collate import PACK_FIELDS, PAD_FIELDS, pack_batch, pad_batch

        i, b = self.next_sample, self.batch_size
        got: list = []
        fields: Sequence[str]
        if not self.pack:
            got = [self.sample(i + k) for k in range(b)]
            arr, _ = pad_batch([g[0] for g in got], [g[1] for g in got], self.seq_len)
            fields = PAD_FIELDS
        else:  # first fit in order, as the loader's packing: stop when the next does not fit
            rows: list[list[int]] = [[]]
            used = 0
            while True:
                ids, spans = self.sample(i + len(got))
                if used + len(ids) > self.seq_len:
                    if len(rows) == b:
                        break
                    rows.append([])
                    used = 0
                rows[-1].append(len(got))
                got.append((ids, spans))
                used += len(ids)
            arr, _ = pack_batch([g[0] for g in got], [g[1] for g in got], rows, self.seq_len)
            fields = PACK_FIELDS
        self.next_sample = i + len(got)
        batch: dict = {f: torch.from_numpy(arr[k]) for k, f in enumerate(fields)}
        batch["dataset"] = ["long" if len(g[0]) >= self.long_len[0] else "short" for g in got]
        batch["__key__"] = [f"{self.rank}-{i + k}" for k in range(len(got))]
        return batch

    def __iter__(self) -> Iterator[dict]:
        while True:
            yield self._next_batch()

    def state_dict(self) -> dict:
        return {"version": 1, "next_sample": self.next_sample}

    def gather_state_dicts(self) -> dict:
        return SyntheticLoader.gather_state_dicts(self)  # type: ignore[arg-type]

    def load_state_dict(self, state: dict) -> None:
        if "ranks" in state:
            state = state["ranks"][self.rank]
        if state.get("version") != 1:
            raise ValueError(f"unknown MixedLengthLoader state version {state.get('version')}")
        self.next_sample = int(state["next_sample"])
