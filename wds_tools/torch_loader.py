"""The torch-facing part of the loader: DataLoader workers, shared-memory hand-off, tensors,
``torch.distributed`` gathering, and a stateful ``IterableDataset`` for other people's loops.

It sits above :mod:`wds_tools.stream` (the torch-free core: reading, mixing, collation,
state) and below :mod:`wds_tools.loader` (the ``build_loader`` front, which imports this module
only when a loader has workers or yields tensors).

Two ways in:

- ``build_loader(...)`` (in :mod:`wds_tools.loader`) owns its DataLoader: workers send compact
  batches in one shared-memory buffer per transfer and the main process expands them; its
  ``state_dict()`` is exact for any number of workers.
- :class:`TokenStream` is a standard ``torch.utils.data.IterableDataset`` with
  ``state_dict()``/``load_state_dict()``, for a ``DataLoader`` you build yourself, torchdata's
  ``StatefulDataLoader``, Lightning or the Hugging Face Trainer. It yields collated batches
  (``DataLoader(ds, batch_size=None)``) or single samples (``batch_size=None`` here: collate
  them yourself).
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .config import DataConfig
from .io import DEFAULT, IOOptions
from .stream import STATE_VERSION, NumpyBackend, _RankStream, build_stream, merge_pieces

__all__ = ["TokenStream", "TorchBackend", "shared_buffer"]


# --- the backend of build_loader's own loader ------------------------------------------------


def shared_buffer(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` in shared memory (it crosses to the main process as a
    handle, not a copy)."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(-1)[:nbytes]


def _as_is(chunk: Any) -> Any:
    """The DataLoader's collate for chunks: none. (Its default for ``batch_size=None``,
    ``default_convert``, walks and copies every list and dict of a chunk's metadata: it cost a
    worker more than building the chunk's batches.)"""
    return chunk


class _StreamDataset(IterableDataset):
    """What the loader's own DataLoader iterates: each worker yields its slot's chunks (module
    level, so it pickles for ``spawn`` workers too)."""

    def __init__(self, stream: _RankStream):
        self.stream = stream

    def __iter__(self):
        info = get_worker_info()
        if info is None:
            return self.stream.chunks(0)
        return self.stream.chunks(info.id, shared_buffer)


class TorchBackend(NumpyBackend):
    """Batches as int64 tensors; with ``num_workers`` > 0 read by DataLoader workers that send
    compact batches in one shared-memory buffer per transfer (expanded in this process, into
    pinned memory when ``pin_memory`` and CUDA is available). ``tensors=False`` keeps numpy
    arrays (workers still need torch)."""

    name = "torch"

    def __init__(self, prefetch_factor: int = 2, pin_memory: bool = False, tensors: bool = True):
        if not isinstance(prefetch_factor, int) or prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be an integer >= 1, got {prefetch_factor!r}")
        self.prefetch_factor, self.tensors = prefetch_factor, tensors
        self.pin = bool(pin_memory and tensors and torch.cuda.is_available())
        self.empty_int64 = self._empty if tensors else None

    def _empty(self, shape: Tuple[int, ...]) -> torch.Tensor:
        return torch.empty(shape, dtype=torch.int64, pin_memory=self.pin)

    def as_output(self, x: np.ndarray) -> Any:  # type: ignore[override]  # needs self.tensors
        return torch.from_numpy(x) if self.tensors else x

    def chunks(self, stream: _RankStream, num_workers: int) -> Iterator[Dict[str, Any]]:
        if not num_workers:
            return stream.chunks(0)
        loader = DataLoader(
            _StreamDataset(stream),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=num_workers,
            prefetch_factor=self.prefetch_factor,
        )
        return iter(loader)

    def gather(self, obj: Any, world_size: int) -> List[Any]:
        """``obj`` of every rank (``torch.distributed.all_gather_object``); ``[obj]`` when not
        distributed."""
        dist = torch.distributed
        if world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return [obj]
        out: List[Any] = [None] * world_size
        dist.all_gather_object(out, obj)
        return out


# --- a stateful IterableDataset for other people's loops -------------------------------------


class TokenStream(IterableDataset):
    """The stream of one data-parallel rank as a stateful ``IterableDataset``.

    Each DataLoader worker (or the main process, without workers) is one consumer slot of the
    same canonical layout as ``build_loader``: with ``num_workers`` equal to the DataLoader's,
    the batches are those of ``build_loader(..., num_workers=N, transfer_batches=1)``.

    - ``batch_size=B``: yields collated batches (dicts of int64 tensors ``input_ids``,
      ``labels``, ``attention_mask`` [+ ``position_ids``, ``segment_ids`` when packing],
      ``lengths`` [B], and lists ``dataset``, ``__key__``); use ``DataLoader(ds,
      batch_size=None)``.
    - ``batch_size=None``: yields samples (``input_ids``, ``labels`` int64 tensors of the
      truncated sample, ``dataset``, ``__key__``); batch them with your own collate.

    ``state_dict()`` is the position of the consumer(s) running in *this* process: exact with
    ``num_workers=0`` and under torchdata's ``StatefulDataLoader`` (which calls it inside each
    worker); a plain ``DataLoader`` with workers cannot report worker positions, so resume
    such runs with ``build_loader``'s loader or ``StatefulDataLoader``.
    """

    def __init__(
        self,
        data_config: Union[DataConfig, str],
        *,
        batch_size: Optional[int] = 8,
        num_workers: int = 0,
        rank: Optional[int] = None,
        world_size: Optional[int] = None,
        max_seq_len: int = 4096,
        pad_id: int = 0,
        seed: Optional[int] = None,
        pack: bool = False,
        shuffle: Optional[bool] = None,
        max_epochs: Optional[int] = None,
        io_options: IOOptions = DEFAULT,
        max_tokens: Optional[int] = None,
    ):
        if batch_size is None and pack:
            raise ValueError("pack=True needs a batch_size (rows per batch)")
        if batch_size is None and max_tokens is not None:
            raise ValueError("max_tokens needs a batch_size (the most samples per batch)")
        self._loader = build_stream(
            data_config,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size or 1,
            num_workers=num_workers,
            max_seq_len=max_seq_len,
            pad_id=pad_id,
            seed=seed,
            pack=pack,
            transfer_batches=1,
            shuffle=shuffle,
            max_epochs=max_epochs,
            io_options=io_options,
            max_tokens=max_tokens,
            whole_batches=num_workers > 1,
        )
        self.per_sample = batch_size is None
        self.num_workers = num_workers
        self._states: Dict[int, Dict[str, Any]] = {}

    def _slot(self) -> int:
        info = get_worker_info()
        n = info.num_workers if info is not None else 0
        if n != self.num_workers:
            raise ValueError(
                f"TokenStream was built for num_workers={self.num_workers} but runs "
                f"in a DataLoader with num_workers={n}: pass the DataLoader's value "
                "(it is part of the data layout)"
            )
        return info.id if info is not None else 0

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        slot = self._slot()
        lo = self._loader
        stream = _RankStream(lo)
        saved = self._states.get(slot)
        if saved is not None:
            stream.part_states = {int(p): s for p, s in saved["parts"].items()}
            stream.clock_state = dict(saved["clock"])
            stream.cursors = [saved["cursor"] if w == slot else 0 for w in range(lo.num_slots)]
        names = stream.fields
        parts: Dict[int, Any] = dict(stream.part_states)
        for ch in stream.chunks(slot):
            flat = ch["arena"]
            for m in ch["batches"]:
                parts.update(m["states"])
                if m["piece"] is None:  # another worker's micro-batch
                    continue
                self._states[slot] = {"parts": dict(parts), "clock": m["clock"], "cursor": m["cursor"]}
                x = merge_pieces([m], [flat], len(names), lo.pad_id)
                assert x is not None
                xt = torch.from_numpy(x)
                if self.per_sample:
                    n = int(m["lengths"][0])
                    yield {
                        "input_ids": xt[0, 0, :n].clone(),
                        "labels": xt[1, 0, :n].clone(),
                        "dataset": m["datasets"][0],
                        "__key__": m["keys"][0],
                    }
                    continue
                batch: Dict[str, Any] = {f: xt[k] for k, f in enumerate(names)}
                batch["lengths"] = torch.tensor(m["lengths"], dtype=torch.int64)
                batch["dataset"] = m["datasets"]
                batch["__key__"] = m["keys"]
                batch["epoch"] = m["epochs"]
                yield batch

    def state_dict(self) -> Dict[str, Any]:
        """The position of the slot(s) iterated in this process (JSON-able)."""
        return {
            "format": "wds_tools.token_stream",
            "version": STATE_VERSION,
            "layout": self._layout(),
            "slots": {
                str(k): {
                    "parts": {str(p): s for p, s in v["parts"].items()},
                    "clock": v["clock"],
                    "cursor": v["cursor"],
                }
                for k, v in self._states.items()
            },
        }

    def load_state_dict(self, sd: Dict[str, Any]) -> None:
        if not isinstance(sd, dict) or sd.get("format") != "wds_tools.token_stream":
            raise ValueError("not a wds_tools TokenStream state")
        if sd.get("version") != STATE_VERSION:
            raise ValueError(
                f"TokenStream state version {sd.get('version')!r} is not supported "
                f"(this wds_tools reads version {STATE_VERSION})"
            )
        if sd.get("layout") != self._layout():
            raise ValueError(
                f"TokenStream state was saved with layout {sd.get('layout')!r}, "
                f"this stream has {self._layout()!r}; resume with the same settings"
            )
        self._states.update({int(k): v for k, v in sd["slots"].items()})

    def _layout(self) -> Dict[str, Any]:
        lo = self._loader
        layout = {
            "rank": lo.rank,
            "world_size": lo.world_size,
            "num_workers": self.num_workers,
            "batch_size": None if self.per_sample else lo.batch_size,
            "seed": lo.seed,
            "max_seq_len": lo.max_seq_len,
            "pack": lo.pack,
            "datasets": [p.name for p in lo.plans],
            "partitions": lo.num_partitions,
        }
        if lo.max_tokens is not None:  # only then: states saved before the option still load
            layout["max_tokens"] = lo.max_tokens
        return layout
