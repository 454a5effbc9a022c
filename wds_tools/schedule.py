"""Weight schedules: a dataset's weight as a function of the global optimizer step.

Megatron-Energon's spelling, so configs carry over::

    weight: {linear: {0: 0.9, 200: 0.1}}   # linear between points, constant outside them
    weight: {step: {0: 0.9, 100: 0.5}}     # piecewise constant: the value of the last point <= s

The step is the loader's count of optimizer steps (``micro-batches / grad_accum``, kept across
resumes and layout changes), so a schedule is a pure function of the run's position.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Tuple

__all__ = ["WeightSchedule", "parse_weight"]

KINDS = ("linear", "step")


@dataclass(frozen=True)
class WeightSchedule:
    kind: str  # "linear" or "step"
    points: Tuple[Tuple[int, float], ...]  # (step, weight), steps strictly increasing

    def at(self, step: float) -> float:
        """The weight at optimizer step ``step``."""
        xs = [x for x, _ in self.points]
        i = bisect.bisect_right(xs, step)
        if i == 0:
            return self.points[0][1]
        if i == len(xs) or self.kind == "step":
            return self.points[i - 1][1]
        (x0, y0), (x1, y1) = self.points[i - 1], self.points[i]
        return y0 + (y1 - y0) * (step - x0) / (x1 - x0)

    @property
    def first(self) -> float:
        return self.points[0][1]

    def to_json(self) -> Dict[str, Dict[str, float]]:
        return {self.kind: {str(x): y for x, y in self.points}}


def parse_weight(v: Any, at: str) -> Tuple[float, "WeightSchedule | None"]:
    """``(constant weight, schedule or None)`` of a config ``weight`` entry."""
    if isinstance(v, Mapping):
        if len(v) != 1 or next(iter(v)) not in KINDS:
            raise ValueError(
                f"{at}: a weight schedule is {{linear: {{STEP: WEIGHT, ...}}}} or "
                f"{{step: {{STEP: WEIGHT, ...}}}}, got keys {sorted(map(str, v))}"
            )
        kind, pts = next(iter(v.items()))
        if not isinstance(pts, Mapping) or not pts:
            raise ValueError(f"{at}: {kind}: needs a non-empty mapping of step: weight")
        points = []
        for x, y in pts.items():
            try:
                xi = int(x)
                if isinstance(x, bool) or float(x) != xi or xi < 0:
                    raise ValueError
            except (TypeError, ValueError):
                raise ValueError(f"{at}: {kind}: step {x!r} must be an integer >= 0") from None
            if isinstance(y, bool) or not isinstance(y, (int, float)) or not y >= 0 or y == float("inf"):
                raise ValueError(f"{at}: {kind}: weight at step {xi} must be a number >= 0, got {y!r}")
            points.append((xi, float(y)))
        points.sort()
        if len({x for x, _ in points}) != len(points):
            raise ValueError(f"{at}: {kind}: a step is given twice")
        return points[0][1], WeightSchedule(kind, tuple(points))
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0 or v == float("inf"):
        raise ValueError(f"{at}: must be a positive number or a schedule, got {v!r}")
    return float(v), None
