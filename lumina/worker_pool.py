"""An order-preserving, bounded process pool for the CPU side of pre-tokenization.

``ordered_map(factory, arg, tasks, num_workers)`` builds ``fn = factory(arg)`` once in each
worker and yields ``fn(*task)`` for each task, in task order. At most ``max_inflight`` tasks are
submitted ahead, so a huge input is streamed, never queued whole. Workers exit on their own if
the parent dies (even by SIGKILL), so a killed rank leaves no orphans behind.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable, Iterable, Iterator

__all__ = ["ordered_map"]

_STATE: dict = {}


def _watch_parent(parent_pid: int) -> None:
    while True:
        if os.getppid() != parent_pid:
            os._exit(1)
        time.sleep(1.0)


def _init_worker(factory: Callable[[Any], Callable], arg: Any, parent_pid: int) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    _STATE["fn"] = factory(arg)


def _call(task: tuple) -> Any:
    return _STATE["fn"](*task)


def ordered_map(
    factory: Callable[[Any], Callable],
    arg: Any,
    tasks: Iterable[tuple],
    num_workers: int,
    max_inflight: int = 0,
) -> Iterator[Any]:
    """Yield ``factory(arg)(*task)`` for each task in order; ``num_workers=0`` runs inline."""
    if num_workers <= 0:
        fn = factory(arg)
        for task in tasks:
            yield fn(*task)
        return
    max_inflight = max_inflight or 4 * num_workers
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding torch/CUDA state
    with ProcessPoolExecutor(
        num_workers, mp_context=ctx, initializer=_init_worker, initargs=(factory, arg, os.getpid())
    ) as pool:
        inflight: deque = deque()
        for task in tasks:
            inflight.append(pool.submit(_call, task))
            if len(inflight) >= max_inflight:
                yield inflight.popleft().result()
        while inflight:
            yield inflight.popleft().result()
