"""The per-rank errors file: one JSON line per bad item (index, reason, message, id).

On resume, entries for items at or past the resume point are dropped (those items are redone)
and the file is rewritten atomically; a torn last line from a crash is dropped too.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

__all__ = ["ErrorLog", "errors_file_name"]


def errors_file_name(rank: int) -> str:
    return f"errors-r{rank:05d}.jsonl"


class ErrorLog:
    """Append-only JSON-lines log of failures, truncated to ``index < keep_below`` on open."""

    def __init__(self, path: str, keep_below: int, source: str):
        self.path, self.source = path, source
        self.by_reason: Counter = Counter()
        kept = self._kept_lines(keep_below)
        tmp = path + ".rewrite"
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        self._f = open(path, "a", encoding="utf-8")

    def _kept_lines(self, keep_below: int) -> list[str]:
        if not os.path.exists(self.path):
            return []
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue  # torn line of a crashed run: its item is redone
                if isinstance(record, dict) and record.get("index", keep_below) < keep_below:
                    kept.append(line if line.endswith("\n") else line + "\n")
                    self.by_reason[record.get("reason", "unknown")] += 1
        return kept

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
