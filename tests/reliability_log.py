"""Figures of the reliability suite: each test records what it injected and what was lost.

Tests call ``record(...)``; nothing is written unless ``RELIABILITY_LOG`` names a file (set by
``benchmarks/reliability_report.py``, which runs the suite and renders ``docs/reliability.md``).
The numbers must come from the run itself (counts of faults actually injected, samples actually
compared), never constants.
"""

import json
import os
import time

__all__ = ["record"]


def record(
    category: str,
    case: str,
    *,
    injected: int = 0,
    tried: int = 0,
    lost: int = 0,
    duplicated: int = 0,
    detected: int = 0,
    note: str = "",
) -> None:
    """One row: ``category`` (crash, network, data, input, security, load), ``case`` (short
    name), ``injected`` faults, ``tried`` inputs/cases, samples/items ``lost`` and ``duplicated``
    (compared against a clean run), faults ``detected`` and reported."""
    path = os.environ.get("RELIABILITY_LOG")
    if not path:
        return
    row = {
        "category": category,
        "case": case,
        "injected": int(injected),
        "tried": int(tried),
        "lost": int(lost),
        "duplicated": int(duplicated),
        "detected": int(detected),
        "note": note,
        "time": time.time(),
        "test": os.environ.get("PYTEST_CURRENT_TEST", ""),
    }
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
