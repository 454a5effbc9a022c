"""A whole run's data, every rank of a layout, in one process (numpy, no torch).

``RunSimulator`` builds the loader of every rank of a layout (``world_size`` ranks of
``num_workers`` workers, micro-batch ``batch_size``, ``grad_accum`` micro-batches per optimizer
step), runs each rank's workers in process in the order a DataLoader delivers them, and yields
the micro-batches of the run step by step. With ``read_data=False`` only shard indexes are read
(keys and token counts), which is what ``wds-tools mix`` and ``wds-tools stream`` replays need.
``state()`` is the run's state (one document, loadable under any layout); ``state=`` continues
from one.
"""

from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from . import io as wio
from .config import DataConfig, resolve_data_config
from .stream import NumpyBackend, StreamingLoader, build_stream, merge_states

__all__ = ["RunSimulator"]


class RunSimulator:
    def __init__(
        self,
        data_config: Union[DataConfig, str],
        *,
        world_size: int = 1,
        num_workers: int = 0,
        batch_size: int = 8,
        grad_accum: int = 1,
        max_seq_len: int = 4096,
        pad_id: int = 0,
        seed: Optional[int] = None,
        pack: bool = False,
        max_tokens: Optional[int] = None,
        transfer_batches: int = 4,
        partitions: Optional[int] = None,
        read_data: bool = False,
        state: Optional[Dict[str, Any]] = None,
        io_options: wio.IOOptions = wio.DEFAULT,
    ):
        if world_size < 1 or grad_accum < 1:
            raise ValueError("world_size and grad_accum must be >= 1")
        self.cfg = resolve_data_config(data_config)
        self.world_size, self.grad_accum = world_size, grad_accum
        self.loaders: List[StreamingLoader] = []
        for r in range(world_size):
            lo = build_stream(
                self.cfg,
                rank=r,
                world_size=world_size,
                batch_size=batch_size,
                num_workers=num_workers,
                max_seq_len=max_seq_len,
                pad_id=pad_id,
                seed=seed,
                pack=pack,
                max_tokens=max_tokens,
                transfer_batches=transfer_batches,
                grad_accum=grad_accum,
                partitions=partitions,
                backend=NumpyBackend(simulate_workers=True),
                io_options=io_options,
            )
            lo.read_data = read_data
            if state is not None:
                lo.load_state_dict(state)
            self.loaders.append(lo)
        self._its: Optional[List[Iterator[Dict[str, Any]]]] = None
        self.ended = False

    @property
    def step(self) -> int:
        """Optimizer steps completed (the run's count, across resumes)."""
        return self.loaders[0].step

    @property
    def num_partitions(self) -> int:
        return self.loaders[0].num_partitions

    @property
    def plans(self):
        return self.loaders[0].plans

    def steps(self, n: int) -> Iterator[Tuple[int, int, int, Dict[str, Any]]]:
        """``(step, rank, micro, batch)`` of the next ``n`` optimizer steps, step by step, rank by
        rank; stops early (``ended``) when a bounded stream ends."""
        if self._its is None:
            self._its = [iter(lo) for lo in self.loaders]
        for _ in range(n):
            step = self.step
            got: List[List[Dict[str, Any]]] = [[] for _ in self.loaders]
            for _ in range(self.grad_accum):
                for r, it in enumerate(self._its):
                    b = next(it, None)
                    if b is None:
                        self.ended = True
                        break
                    got[r].append(b)
                if self.ended:
                    break
            for r in range(self.world_size):
                for m, b in enumerate(got[r]):
                    yield step, r, m, b
            if self.ended:
                return

    def micro_batches(self) -> Iterator[List[Dict[str, Any]]]:
        """Every rank's next micro-batch, together (one global micro-batch), until the end."""
        if self._its is None:
            self._its = [iter(lo) for lo in self.loaders]
        while True:
            bs = [next(it, None) for it in self._its]
            if any(b is None for b in bs):
                self.ended = True
                return
            yield bs  # type: ignore[misc]

    def state(self) -> Dict[str, Any]:
        """The run's state after the last micro-batch yielded (one document)."""
        return merge_states({"ranks": [lo.state_dict() for lo in self.loaders]})
