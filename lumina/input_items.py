"""Reading the input: JSON lists (``.json``), JSON lines (``.jsonl``) or raw tar shards, split
across ranks.

**One file** (the reference's way): item ``i`` (its 0-based position in the list, or its line
number in a ``.jsonl`` file; blank lines are skipped but keep their number) belongs to rank
``i % splits``: round-robin, so ranks get similar mixes of item kinds. A ``.jsonl`` rank streams
the file and only parses its own lines, but every rank reads the whole file: the slow path for a
huge single file. A ``.json`` list has to be loaded whole, as the reference does.

**Several files** (a list, or a brace pattern such as ``part-{0000..0511}.jsonl``): file ``f``
belongs to rank ``f % splits``, and a rank never opens the files it does not own. Item ``j`` of
file ``f`` has index ``f * SOURCE_STRIDE + j``. Raw image-text tar shards are split the same
way, by shard (:mod:`lumina.raw_shards`).

Files are read through :func:`wds_tools.io.open_range`, so they may be local, ``https://`` or
``s3://``. Parsing a line is left to the worker processes (:class:`JsonLine`), so a broken line
becomes a reported bad item, not a crash. Lists of inputs are expanded lazily.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import braceexpand

from lumina.raw_shards import SOURCE_STRIDE, iter_raw_items, shard_name
from wds_tools import io as wio

__all__ = [
    "InputSpec",
    "JsonLine",
    "count_rank_items",
    "iter_inputs",
    "iter_rank_items",
    "iter_file_items",
]


class JsonLine(str):
    """An unparsed ``.jsonl`` line (decoded with ``surrogateescape``); parsed in the worker."""


class InputSpec:
    """What ``--in_filename`` names: one or more paths/URLs or brace patterns, expanded lazily.

    ``kind`` is ``"raw"`` (tar shards), ``"jsonl"`` or ``"json"``; ``multi`` says whether inputs
    are split by file (several files, or any raw shards) or by item (one JSON/JSONL file).
    """

    def __init__(self, spec: Union[str, Sequence[str]]):
        self.patterns = [spec] if isinstance(spec, str) else list(spec)
        if not self.patterns:
            raise ValueError("--in_filename: no input given")
        head = list(_take(self.urls(), 2))
        if not head:
            raise ValueError(f"--in_filename {self.patterns[0]!r}: expands to nothing")
        self.kind = _kind(head[0])
        self.multi = self.kind == "raw" or len(head) > 1
        self.first = head[0]

    def urls(self) -> Iterator[str]:
        """Every input, in order, one at a time (a 10,000-shard pattern is never listed whole)."""
        for pattern in self.patterns:
            yield from braceexpand.braceexpand(pattern)

    def validate(self) -> None:
        """Refuse mixed kinds and missing local files (remote inputs are checked when read)."""
        for url in self.urls():
            if _kind(url) != self.kind:
                raise ValueError(
                    f"--in_filename: {wio.redact(url)!r} is not a {self.kind} input like "
                    f"{wio.redact(self.first)!r} (one kind per run)"
                )
            if not wio.is_remote(url) and not os.path.isfile(wio.local_path(url)):
                raise ValueError(f"--in_filename {url!r}: no such file")

    def source_name(self) -> str:
        """A short name of the input for the summary and the done-marker."""
        name = shard_name(self.first)
        return name if not self.multi else f"{name} (+ more {self.kind} inputs)"


def _take(it: Iterator[str], n: int) -> Iterator[str]:
    for k, x in enumerate(it):
        if k >= n:
            return
        yield x


def _kind(url: str) -> str:
    path = wio.redact(url)
    if path.endswith(".tar"):
        return "raw"
    if path.endswith(".jsonl"):
        return "jsonl"
    if path.endswith(".json"):
        return "json"
    raise ValueError(f"--in_filename {path!r}: expected .json, .jsonl or .tar (raw image-text shards) inputs")


def iter_inputs(
    spec: InputSpec, splits: int, rank: int, start: int = 0, state: Optional[dict] = None
) -> Iterator[tuple[int, Any, str]]:
    """``(index, raw_item, source)`` of this rank, from input index ``start`` on."""
    if spec.kind == "raw":
        for index, sample in iter_raw_items(spec.urls(), splits, rank, start, state):
            yield index, sample, sample.shard
    elif spec.multi:
        yield from iter_file_items(spec.urls(), splits, rank, start)
    else:
        source = shard_name(spec.first)
        for index, item in iter_rank_items(spec.first, splits, rank, start):
            yield index, item, source


def iter_file_items(
    urls: Iterable[str], splits: int, rank: int, start: int = 0
) -> Iterator[tuple[int, Any, str]]:
    """Several files: file ``f`` is rank ``f % splits``'s; the others are never opened."""
    for file_no, url in enumerate(urls):
        if file_no % splits != rank or (file_no + 1) * SOURCE_STRIDE <= start:
            continue
        base, source = file_no * SOURCE_STRIDE, shard_name(url)
        for j, item in iter_rank_items(url, 1, 0, max(0, start - base)):
            if j >= SOURCE_STRIDE:
                raise ValueError(
                    f"{wio.redact(url)}: more than {SOURCE_STRIDE} items in one input file "
                    "(split it into several files)"
                )
            yield base + j, item, source


def iter_rank_items(path: str, splits: int, rank: int, start: int = 0) -> Iterator[tuple[int, Any]]:
    """``(index, item)`` for the items of ``rank`` with ``index >= start`` in one file, in order."""
    if _kind(path) == "jsonl":
        with wio.open_range(path) as f:
            for index, line in enumerate(f):
                if index >= start and index % splits == rank and line.strip():
                    yield index, JsonLine(line.decode("utf-8", "surrogateescape"))
        return
    with wio.open_range(path) as f:
        try:
            items = json.load(f)
        except ValueError as e:
            raise ValueError(f"--in_filename {wio.redact(path)}: not valid JSON: {e}") from None
    if not isinstance(items, list):
        raise ValueError(f"--in_filename {wio.redact(path)}: a .json input must hold a JSON list of items")
    for index in range(rank, len(items), splits):
        if index >= start:
            yield index, items[index]


def count_rank_items(spec: Union[str, InputSpec], splits: int, rank: int) -> Optional[int]:
    """How many items ``rank`` owns (for the progress bar): counts lines of local ``.jsonl``
    inputs; ``None`` where that would mean parsing a list or reading remote or raw inputs."""
    spec = spec if isinstance(spec, InputSpec) else InputSpec(spec)
    if spec.kind != "jsonl":
        return None
    if not spec.multi:
        return _count_lines(spec.first, splits, rank)
    total = 0
    for file_no, url in enumerate(spec.urls()):
        if file_no % splits == rank:
            count = _count_lines(url, 1, 0)
            if count is None:
                return None
            total += count
    return total


def _count_lines(url: str, splits: int, rank: int) -> Optional[int]:
    if wio.is_remote(url):
        return None
    with open(wio.local_path(url), "rb") as f:
        return sum(1 for i, line in enumerate(f) if i % splits == rank and line.strip())
