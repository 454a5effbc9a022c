"""Reading the input file: a JSON list (``.json``) or JSON lines (``.jsonl``), split across ranks.

Item ``i`` (its 0-based position in the list, or its line number in a ``.jsonl`` file; blank
lines are skipped but keep their number) belongs to rank ``i % splits``: round-robin, so ranks
get similar mixes of item kinds. A ``.jsonl`` rank streams the file and only parses its own
lines (it never holds other ranks' items); a ``.json`` list has to be loaded whole, as the
reference does. Parsing a line is left to the worker processes (:class:`JsonLine`), so a broken
line becomes a reported bad item, not a crash.
"""

from __future__ import annotations

import json
from typing import Any, Iterator, Optional

__all__ = ["JsonLine", "count_rank_items", "iter_rank_items"]


class JsonLine(str):
    """An unparsed ``.jsonl`` line; parsed in the worker."""


def _is_jsonl(path: str) -> bool:
    return path.endswith(".jsonl")


def iter_rank_items(path: str, splits: int, rank: int, start: int = 0) -> Iterator[tuple[int, Any]]:
    """``(index, item)`` for the items of ``rank`` with ``index >= start``, in file order."""
    if _is_jsonl(path):
        with open(path, encoding="utf-8") as f:
            for index, line in enumerate(f):
                if index >= start and index % splits == rank and line.strip():
                    yield index, JsonLine(line)
        return
    with open(path, encoding="utf-8") as f:
        items = json.load(f)
    if not isinstance(items, list):
        raise ValueError(f"--in_filename {path}: a .json input must hold a JSON list of items")
    for index in range(rank, len(items), splits):
        if index >= start:
            yield index, items[index]


def count_rank_items(path: str, splits: int, rank: int) -> Optional[int]:
    """How many items ``rank`` owns (for the progress bar); counts lines for ``.jsonl``."""
    if _is_jsonl(path):
        with open(path, "rb") as f:
            return sum(1 for i, line in enumerate(f) if i % splits == rank and line.strip())
    return None  # known after loading; the caller asks iter_rank_items' list instead
