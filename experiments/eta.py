"""The time a grid has left: measured run times where there are some, a model elsewhere.

A cell's expected time is the mean of the runs of its (configuration, technique) done so far;
before any, the time the link needs for the state plus the container's overhead, scaled by what
each technique adds (post-copy's round trips on a long link), plus a fixed cost per run
(deployment, probe lead and tail).
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Final

from fogmig.experiments.grid import CONFIGURATIONS, Cell, GridSpec, base_configuration
from fogmig.platform.testbed.profiles import load_profile

FIXED_S: Final = 20.0
"""Deployment, probe lead and tail, removal: per run, whatever its size."""
OVERHEAD_MB: Final = 20.0
"""What a container moves beyond its service's state."""
FACTOR: Final = {"cold": 1.05, "precopy": 1.2, "postcopy": 1.4, "hybrid": 1.5}
LONG_RTT_MS: Final = 50.0
LONG_RTT_FACTOR: Final = 1.35
"""Post-copy and hybrid fault pages in by round trips: slower on a long link."""


def model_s(spec: GridSpec, cell: Cell) -> float:
    """The modelled time of one run of ``cell``."""
    link = load_profile(CONFIGURATIONS[base_configuration(cell.configuration)].profile)
    transfer = (spec.state_mb + OVERHEAD_MB) * 8 / link.rate_mbit
    factor = FACTOR.get(cell.technique, 1.0)
    if link.rtt_ms >= LONG_RTT_MS and cell.technique in ("postcopy", "hybrid"):
        factor *= LONG_RTT_FACTOR
    return FIXED_S + transfer * factor


class Eta:
    """Remaining time of a grid, updated as runs finish."""

    def __init__(self, spec: GridSpec, *, done_runs: Sequence[tuple[Cell, float]] = ()) -> None:
        self.spec = spec
        self._seen: dict[tuple[str, str], list[float]] = {}
        self._left = set(spec.cells())
        for cell, wall in done_runs:
            self.finished(cell, wall)

    def skip(self, cells: Sequence[Cell] | set[Cell]) -> None:
        """Cells that need no run (done before a resume)."""
        self._left -= set(cells)

    def finished(self, cell: Cell, wall_s: float) -> None:
        self._seen.setdefault((cell.configuration, cell.technique), []).append(wall_s)
        self._left.discard(cell)

    def expected_s(self, cell: Cell) -> float:
        seen = self._seen.get((cell.configuration, cell.technique))
        return statistics.fmean(seen) if seen else model_s(self.spec, cell)

    def remaining_s(self) -> float:
        return sum(self.expected_s(c) for c in self._left)

    def text(self) -> str:
        total = len(self.spec.cells())
        left = len(self._left)
        seconds = self.remaining_s()
        when = f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"
        return f"{total - left}/{total} done, about {when} left"
