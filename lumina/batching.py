"""Batched image encoding that keeps items in input order.

Prepared items arrive in order. Each image joins the queue of its crop size (its bucket); a
bucket is encoded as one batch when it holds ``batch_size`` images. An item is released, in
order, once all its images are encoded. If more than ``max_pending`` items wait (the head item
stuck in a bucket that fills slowly), the head's bucket is encoded as a partial batch, which
bounds memory and latency.
"""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any, Callable, Iterator, Sequence

import numpy as np

__all__ = ["OrderedBucketEncoder"]


class _Pending:
    __slots__ = ("item", "blocks", "missing")

    def __init__(self, item: Any, num_images: int):
        self.item, self.blocks, self.missing = item, [None] * num_images, num_images


class OrderedBucketEncoder:
    """Feed results with :meth:`add`, get ``(item, blocks)`` back in order; :meth:`flush` at the end.

    ``encode`` maps a list of same-size uint8 crops to one image block each. Results without
    images (text-only items, failures) pass through in their place.
    """

    def __init__(self, encode: Callable[[Sequence[np.ndarray]], list], batch_size: int, max_pending: int):
        if batch_size < 1 or max_pending < 1:
            raise ValueError("--batch_size and max_pending must be >= 1")
        self.encode, self.batch_size, self.max_pending = encode, batch_size, max_pending
        self.pending: deque[_Pending] = deque()
        self.buckets: dict = defaultdict(list)
        self.num_batches = self.num_images = 0
        self.encode_seconds = 0.0

    def add(self, item: Any) -> Iterator[tuple[Any, list]]:
        images = getattr(item, "images", None) or []
        entry = _Pending(item, len(images))
        self.pending.append(entry)
        for k, image in enumerate(images):
            bucket = self.buckets[image.size]
            bucket.append((entry, k))
            if len(bucket) >= self.batch_size:
                self._encode_bucket(image.size)
        while len(self.pending) > self.max_pending and self.pending[0].missing:
            self._encode_bucket(self._head_bucket())
        return self._release()

    def flush(self) -> Iterator[tuple[Any, list]]:
        while self.pending:
            if self.pending[0].missing:
                self._encode_bucket(self._head_bucket())
            yield from self._release()

    def _head_bucket(self) -> tuple[int, int]:
        head = self.pending[0]
        k = next(k for k, block in enumerate(head.blocks) if block is None)
        return head.item.images[k].size

    def _encode_bucket(self, size: tuple[int, int]) -> None:
        batch = self.buckets.pop(size)
        start = time.perf_counter()
        blocks = self.encode([entry.item.images[k].pixels for entry, k in batch])
        self.encode_seconds += time.perf_counter() - start
        self.num_batches += 1
        self.num_images += len(batch)
        for (entry, k), block in zip(batch, blocks):
            entry.blocks[k] = block
            entry.item.images[k].pixels = None  # free the crop; the block is all we keep
            entry.missing -= 1

    def _release(self) -> Iterator[tuple[Any, list]]:
        out = []
        while self.pending and not self.pending[0].missing:
            entry = self.pending.popleft()
            out.append((entry.item, entry.blocks))
        return iter(out)
