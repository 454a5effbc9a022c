"""The per-rank errors file: one JSON line per bad item (index, reason, message, id).

On resume, entries for items at or past the resume point are dropped (those items are redone)
and the file is rewritten atomically (streamed: memory does not grow with the number of
failures); a torn last line from a crash is dropped too. :meth:`ErrorLog.take_new` copies the
lines written since its last call into a file of their own: the per-shard piece that object-store
output uploads with each shard, so a resumed rank can rebuild the file.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from typing import Any, Optional, TextIO

__all__ = ["ErrorLog", "errors_file_name"]


def errors_file_name(rank: int) -> str:
    return f"errors-r{rank:05d}.jsonl"


class ErrorLog:
    """Append-only JSON-lines log of failures, truncated to ``index < keep_below`` on open."""

    def __init__(self, path: str, keep_below: int, source: str):
        self.path, self.source = path, source
        self.by_reason: Counter = Counter()
        tmp = path + ".rewrite"
        with open(tmp, "w", encoding="utf-8") as out:
            self._copy_kept(keep_below, out)
        os.replace(tmp, path)
        self._f = open(path, "a", encoding="utf-8")
        self._published = self._f.tell()  # everything kept was published before

    def _copy_kept(self, keep_below: int, out: TextIO) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # torn line of a crashed run: its item is redone
                if isinstance(record, dict) and record.get("index", keep_below) < keep_below:
                    out.write(line if line.endswith("\n") else line + "\n")
                    self.by_reason[record.get("reason", "unknown")] += 1

    def take_new(self, path: str) -> Optional[str]:
        """Write the lines added since the last call to ``path``; ``path``, or ``None`` if none."""
        self._f.flush()
        end = self._f.tell()
        if end <= self._published:
            return None
        with open(self.path, "rb") as src, open(path, "wb") as out:
            src.seek(self._published)
            shutil.copyfileobj(src, out)
        self._published = end
        return path

    def write(self, record: dict[str, Any]) -> None:
        record = {"source": self.source, **record}
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        self.by_reason[record["reason"]] += 1

    @property
    def num_failed(self) -> int:
        return sum(self.by_reason.values())

    def close(self) -> None:
        self._f.close()
