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

    def __init__(self, vocab_size: int, batch_size: int, seq_len: int, *, rank: int = 0,
                 seed: int = 0, num_distinct: int = 0, min_len: int = 0, prompt_len: int = 2,
                 pad_id: int = 0, datasets: Sequence[str] = ("synthetic_a", "synthetic_b"),
                 min_token: int = 1) -> None:
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
        return {"input_ids": ids, "labels": labels, "attention_mask": mask, "dataset": names,
                "__key__": keys}

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

